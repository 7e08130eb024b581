"""Pre: the pre-trained backbone with a cosine ProtoNet head (s = 10, b = 0); no meta-training.

Baseline of the paper's Tables 1 and 3 (``baselines.md`` §5): the task model is θ_pre itself.
"""

from methods._registry import register_method
from methods.base import Method, TaskModel


@register_method("pre")
class Pre(Method):
    """The pre-trained backbone as it is. Args: see `Method`."""

    trains = False

    def __init__(self, backbone, **kwargs):
        super().__init__(backbone, **kwargs)
        self.backbone.requires_grad_(False)

    def task_model(self, support_x, support_y, ways):
        return TaskModel(self.backbone, self.pretrained_params()).fit(support_x, support_y, ways)
