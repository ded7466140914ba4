"""Export a trained student to one safetensors file (LoRA merged), optionally also as a diffusers folder.

    python scripts/export.py RUN_DIR_or_CHECKPOINT --out student.safetensors [--ema] [--diffusers DIR] [--keep-lora]
                             [--peft DIR]

A run folder gives its final student (or, mid-run, its latest complete checkpoint's); --ema takes the
EMA weights. Load the result with ``students.load_student(path)`` and sample with ``.sample(noise, steps)``.
``--diffusers DIR`` writes a pipeline folder diffusers loads without this project (``ConsistencyModelPipeline`` with
diffusers' ``DDIMScheduler`` where it is exact, else the project's ``FewStepScheduler`` with its source in the folder,
loaded with ``DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)``: ``students.diffusers_export``; a
prompt-conditioned student: a
``LatentConsistencyModelPipeline`` or ``StableDiffusionPipeline`` folder with the vae, text encoder and tokenizer
copied from its teacher's folder, the one the student file names or ``--teacher DIR``). A LoRA student from a checkpoint (where
the adapter is not merged) can keep it separate (``--keep-lora``) and be written as a PEFT adapter (``--peft DIR``,
loadable with ``PeftModel.from_pretrained(base, DIR)``); a merged source is refused for both.
"""

from __future__ import annotations

import os as _os
import sys as _sys

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

import argparse
import json
import sys

from distill.engine.export import read_student_file, resolve_student_file, save_student
from distill.engine.lora import has_lora, save_peft_adapter
from distill.engine.paths import check_output_dir, check_output_file
from students import load_student
from students.diffusers_export import check_diffusers_exportable, save_diffusers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a run folder, a checkpoint folder or a student file")
    p.add_argument("--out", required=True, help="the student.safetensors to write")
    p.add_argument("--ema", action="store_true", help="export the EMA of the student")
    p.add_argument("--diffusers", default=None, metavar="DIR", help="also save a UNet student as a diffusers folder")
    p.add_argument("--teacher", default=None, metavar="DIR",
                   help="the text-to-image teacher folder a prompt student's --diffusers folder copies (default: the recorded one)")
    p.add_argument("--keep-lora", action="store_true", help="keep a LoRA adapter separate instead of merging it")
    p.add_argument("--peft", default=None, metavar="DIR", help="also write the LoRA adapter in PEFT's layout")
    args = p.parse_args(argv)
    try:
        check_output_file(args.out, "--out")
        if args.diffusers:
            check_output_dir(args.diffusers, "--diffusers")
        if args.peft:
            check_output_dir(args.peft, "--peft")
        src = resolve_student_file(args.source, ema=args.ema, log=print)
        student = load_student(src)
        if (args.keep_lora or args.peft) and not has_lora(student.net):
            raise ValueError(f"--keep-lora / --peft need an unmerged LoRA adapter, but {str(src)!r} holds merged weights (a "
                             f"finished run merges it): export from a checkpoint folder (checkpoints/step-N) instead")
        if args.diffusers:
            check_diffusers_exportable(student, args.teacher)  # before --out is written
        _, meta = read_student_file(src)
        config = json.loads(meta.get("training_config", "{}"))
        save_student(student, args.out, merge_lora=not args.keep_lora, training_config=config)
        if args.diffusers:
            save_diffusers(student, args.diffusers, args.teacher)
        if args.peft:
            save_peft_adapter(student.net, student.info["lora"], args.peft, base_model=student.info.get("teacher"))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {src} -> {args.out}" + (f" and {args.diffusers}" if args.diffusers else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
