"""Lesson 05: how many taps of a 3×3 kernel at a rate read inside the map."""
CHECK = "check_taps_inside"


def taps_inside(size, rate):
    c = size // 2
    along = sum(0 <= c + t * rate < size for t in (-1, 0, 1))  # per axis; the kernel is a
    return along * along  # product of the two axes' taps


def forgot_the_centre(size, rate):
    return 9 if rate <= size // 2 else 0


SOLUTION, MISTAKE = taps_inside, forgot_the_centre
