"""Lesson 04: the 3×3 dilations of layer3 and layer4 for an output stride."""
CHECK = "check_stage_dilations"


def stage_dilations(output_stride):
    # each stage that gives up its stride 2 multiplies the dilation by 2 from its second block
    # on; its first block (which held the stride) keeps the dilation of the stage before
    layer3 = 2 if output_stride == 8 else 1
    layer4 = {8: 4, 16: 2, 32: 1}[output_stride]
    return {"layer3": (1, layer3), "layer4": (layer3 if layer4 > 1 else 1, layer4)}


def every_block_dilated(output_stride):
    layer3 = 2 if output_stride == 8 else 1
    layer4 = {8: 4, 16: 2, 32: 1}[output_stride]
    return {"layer3": (layer3, layer3), "layer4": (layer4, layer4)}


SOLUTION, MISTAKE = stage_dilations, every_block_dilated
