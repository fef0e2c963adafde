"""`abliterate verify MODEL OUTPUT --plan PLAN_JSON`: check an export against its source."""

from __future__ import annotations

from ..recipe import Plan
from ..verify import summary, verify, write_report

HELP = "check an exported model: tensors, untouched bits, edit invariants, load + generate"


def add_arguments(parser) -> None:
    parser.add_argument("model_dir", help="the source model directory")
    parser.add_argument("output", help="the exported model directory")
    parser.add_argument("--plan", required=True, help="plan.json the export was made from")
    parser.add_argument("--json", metavar="OUT", help="write verify.json here")
    parser.add_argument("--text", metavar="OUT", help="write the human summary here")
    parser.add_argument("--device", default=None, help="compute device for recomputing edits")
    parser.add_argument(
        "--generate",
        choices=["auto", "yes", "no"],
        default="auto",
        help="load with transformers and generate (auto: only small models)",
    )


def run(args) -> int:
    plan = Plan.load(args.plan)
    generate = {"auto": None, "yes": True, "no": False}[args.generate]
    report = verify(args.model_dir, args.output, plan, generate=generate, device=args.device)
    if args.json:
        write_report(report, args.json, args.text)
    else:
        print(summary(report), end="")
    return 0 if report["ok"] else 1
