"""A copy of a volume model whose generator sees more neighbouring slices, predicting exactly what it did.

    python tools/expand_context.py runs/seed8_cv0_bf16/model runs/ctx/start2 --context 2

The image encoder's first convolutions (its stem's 3x3 and 1x1) take ``2 * context + 1`` channels, the slice and its
neighbours (``data.slice_stack``). The copy keeps the old weights on the channels the old model saw and gives the
new, outer neighbours zero weight, so its predictions are the old model's, bit for bit, until a fine-tune teaches
it to use them. Fine-tuning the copy and the original with one config and seed gives a paired test of more
through-plane context (session 24) in which the two arms start from the same function.
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdal_core.model_io import load_model, save_model  # noqa: E402
from cdal_core.networks import Generator  # noqa: E402

STEM_WEIGHTS = ("encoder.stem.conv1.conv.weight", "encoder.stem.conv3.conv.weight")


def expanded_generator(generator: Generator, context: int) -> Generator:
    """``generator`` with ``context`` slices either side, the outer ones weighted zero."""
    old = generator.cfg.context_slices
    if context < old:
        raise SystemExit(f"the model already sees {old} slice(s) either side: give --context {old} or more")
    cfg = copy.deepcopy(generator.cfg)
    cfg.context_slices = context
    grown = Generator(cfg)
    state = generator.state_dict()
    channels = generator.cfg.image_channels
    offset = (context - old) * channels  # the old slices sit in the middle of the new stack
    for key in STEM_WEIGHTS:
        weight = torch.zeros_like(grown.state_dict()[key])
        weight[:, offset:offset + state[key].shape[1]] = state[key]
        state[key] = weight
    grown.load_state_dict(state)
    return grown


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--context", type=int, required=True, help="slices either side (the model's own is 1 or more)")
    args = p.parse_args()
    model = load_model(args.model)
    if model.members:
        raise SystemExit(f"{args.model} is an ensemble: expand a single-generator model")
    generator = expanded_generator(model.generator, args.context)
    card = copy.deepcopy(model.card)
    card["network"]["context_slices"] = args.context
    card["input"]["context_slices"] = args.context
    card["note"] = (f"{args.model} with {args.context} context slices either side; the new ones weighted zero "
                    "(tools/expand_context.py): the same predictions until fine-tuned")
    save_model(args.out, card, generator, model.discriminator)
    print(json.dumps({"model": args.out, "context_slices": args.context}))


if __name__ == "__main__":
    main()
