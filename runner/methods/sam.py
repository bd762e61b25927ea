"""SAM (Foret et al. 2021) as a method: the ERM loss under the SAM update rule (`runner.update`).

`+method=sam` is ERM with `sam: true`; `method.adaptive=true` gives ASAM (Kwon et al. 2021). Any other
method becomes sharpness-aware with the override `method.sam=true` (e.g. `+method=trades method.sam=true`).
"""

from dataclasses import dataclass

from runner.methods.erm import ERM
from runner.methods.erm import Config as ERMConfig


@dataclass
class Config(ERMConfig):
    name: str = "sam"
    sam: bool = True


class SAM(ERM):
    def __init__(self, cfg):
        super().__init__(cfg)
        if not cfg.method.sam:
            raise ValueError("method.sam must be true for +method=sam (use +method=erm for plain ERM)")


def build(cfg):
    return SAM(cfg)
