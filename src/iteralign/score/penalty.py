"""The length penalty r - lambda * len(y) (RLHF Workflow, Eq. 9), applied in the score step.

Length is the completion's characters, or its policy tokens (the samples'
``num_output_tokens``, as the sampler counted them). A coefficient of 0 gives 0
for every row, so the rewards table always has the ``length_penalty`` column.
"""

from __future__ import annotations

import numpy as np

from iteralign.errors import UserError


def length_penalties(samples, penalty: dict) -> np.ndarray:
    """lambda * length per row of a samples frame. ``penalty``: {coefficient, unit}."""
    coefficient, unit = float(penalty["coefficient"]), penalty["unit"]
    if unit == "characters":
        lengths = np.array([len(text) for text in samples["output"]], dtype=float)
    elif unit == "tokens":
        if "num_output_tokens" not in samples.columns:
            raise UserError(
                "scoring.length_penalty.unit='tokens' needs the samples' num_output_tokens column, "
                f"found columns {list(samples.columns)}"
            )
        lengths = samples["num_output_tokens"].to_numpy(dtype=float)
    else:
        raise UserError(f"scoring.length_penalty.unit: found {unit!r}; expected 'characters' or 'tokens'")
    return coefficient * lengths
