"""Write the sample datasets the examples read (verl's parquet schema; nothing downloaded),
and a tiny random reward model for examples/reward-model-grpo.yaml.

    python scripts/make_example_data.py [OUT_DIR]      # default: examples/data
"""

import sys
from pathlib import Path

from rlhfless.model.reward_fixture import write_tiny_reward_model
from rlhfless.rewards.samples import write_samples

if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1] / "examples/data"
    for name, path in write_samples(out).items():
        print(f"{name}: {path}")
    print(f"tiny-rm: {write_tiny_reward_model(out / 'tiny-rm')}")
