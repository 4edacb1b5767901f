"""Lesson 13: move a backbone, parameters and batch-norm statistics, into a new network."""
CHECK = "check_move_backbone"


def move_backbone(source, target):
    prefix = "backbone."
    target.backbone.load_state_dict({k[len(prefix):]: v for k, v in source.items()
                                     if k.startswith(prefix)})


def parameters_only(source, target):
    """Only the parameters: the batch-norm statistics stay the fresh network's."""
    own = dict(target.backbone.named_parameters())
    target.backbone.load_state_dict({k[9:]: v for k, v in source.items()
                                     if k.startswith("backbone.") and k[9:] in own},
                                    strict=False)


SOLUTION, MISTAKE = move_backbone, parameters_only
