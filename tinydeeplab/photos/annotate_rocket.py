"""How rocket_labels.png was made from rocket.jpg (run: python annotate_rocket.py).

The photograph is a launch pad at dusk: a rocket, two lightning masts and two lattice towers
against a smooth sky.  Annotating a lattice tower's beams by hand is not possible at the pixel
level, so the annotation combines a hand-drawn box per object with a colour test:

1. the sky's colour is modelled as a smooth function of the pixel position (a low-order
   polynomial in x and y, fitted robustly: pixels far from the fit are dropped and the fit
   repeated), over the rows above the horizon (0-335);
2. inside each object's box (drawn by hand from the photograph), a pixel whose colour is far
   from the sky model (distance > 24 levels in RGB) belongs to the object, one close to it
   (< 10) is sky, and one in between is void (255), as VOC marks uncertain boundaries;
3. outside the boxes everything is sky (stars and cables are left as sky);
4. rows 336 and below (clouds, the pad, lamps and their flares) are not annotated: void.

Classes: 0 sky, 1 rocket (with its service arms), 2 tower (masts and lattice towers).
Because step 2 uses colour, the boundaries follow colour edges exactly — which is what a
bilateral CRF also looks for; a hand annotation would be rougher.  The lesson says so.
"""
import numpy as np
from PIL import Image

HORIZON = 336  # first row not annotated
BOXES = {  # class: [(x0, x1, y0, y1), ...], in pixels of the 640×427 photograph
    2: [(0, 100, 0, HORIZON), (165, 212, 110, HORIZON), (432, 478, 110, HORIZON),
        (550, 640, 0, HORIZON)],
    1: [(295, 348, 110, HORIZON)],
}
OBJECT, SKY = 24.0, 10.0  # colour distances from the sky model


def sky_distance(image):
    h, w, _ = image.shape
    yy, xx = np.mgrid[0:h, 0:w]
    y, x = yy.ravel() / h, xx.ravel() / w - 0.5
    basis = np.stack([np.ones_like(y), y, y * y, y ** 3, x, x * x, x * y, x * x * y, x ** 4], 1)
    pixels = image.reshape(-1, 3).astype(np.float64)
    keep = np.ones(len(pixels), bool)
    for _ in range(6):
        coef = np.linalg.lstsq(basis[keep], pixels[keep], rcond=None)[0]
        dist = np.sqrt(((pixels - basis @ coef) ** 2).sum(1))
        keep = dist < max(3 * np.median(dist[keep]), 4.0)
    return dist.reshape(h, w)


def main():
    image = np.asarray(Image.open("rocket.jpg").convert("RGB"))
    dist = sky_distance(image[:HORIZON])
    labels = np.full(image.shape[:2], 255, np.uint8)
    labels[:HORIZON] = 0
    for cls, boxes in BOXES.items():
        for x0, x1, y0, y1 in boxes:
            d = dist[y0:y1, x0:x1]
            region = labels[y0:y1, x0:x1]
            region[d > OBJECT] = cls
            region[(d >= SKY) & (d <= OBJECT)] = 255
    out = Image.fromarray(labels)
    palette = np.zeros((256, 3), np.uint8)  # VOC's colours: black, dark red, green; void cream
    palette[1], palette[2], palette[255] = (128, 0, 0), (0, 128, 0), (224, 224, 192)
    out.putpalette(palette.ravel().tolist())
    out.save("rocket_labels.png", optimize=True)
    counts = {c: int((labels == c).sum()) for c in (0, 1, 2, 255)}
    print("pixels per class (0 sky, 1 rocket, 2 tower, 255 void):", counts)


if __name__ == "__main__":
    main()
