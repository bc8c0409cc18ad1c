"""Where one train step's time goes, ours and diffusers' PyTorch trainer's, by part of the step, in one run.

    taskset -c 1 python bench/profile_step.py --model small                # the small UNet, 32 px, batch 16
    taskset -c 1 python bench/profile_step.py --model small --isa avx2     # both sides limited to AVX2
    taskset -c 1 python bench/profile_step.py --model default --batch-size 4 --steps 2

The steps are bench_train_step.py's (ours: the trainer's jitted step; theirs: what train_unconditional.py does per
step), each traced over `--steps` steps on one core: XLA's ops under jax.profiler, each matched to the optimized
program's instruction and the Python functions that made it (the program's stack frames); torch's ops under
torch.profiler by self time. Both sides' op time is sorted into the same parts:

  convolutions            XLA's convolution ops (and YNNPACK fusions holding one); torch's `*convolution*` ops
  conv layout copies      ours only: the transposed copies XLA:CPU feeds its weight-gradient convolutions
  attention               ops made in models/attention.py; torch's scaled_dot_product_attention ops
  group norm + SiLU       ops made by GroupNorm / group_norm or named silu; torch's group_norm and silu ops
  linear layers           matrix products outside the attention core; torch's mm / addmm / bmm
  outside the UNet        ours: ops no UNet frame made (noise, loss, gradient norm, AdamW); theirs: ops inside
                          `clip_grad_norm_` and `Optimizer.step`
  other                   the rest (residual adds, the time embedding, resampling, copies)

It must run pinned to one core: with more threads XLA:CPU hands a convolution to its thread pool and its event ends
before the work does. The convolutions' rates: our FLOPs from the program's shapes, torch's from its
FlopCounterMode (ours upsample with fewer: `resnet.upsample_conv_phases`), each over its side's convolution time.
Not a test: timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import sys
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import bench_train_step  # noqa: E402 -- after the path

PARTS = (
    "convolutions",
    "conv layout copies",
    "attention",
    "group norm + SiLU",
    "linear layers",
    "outside the UNet",
    "other",
)
# Our files whose frames mark an op as the UNet's, and the attention's.
_UNET_FILES = ("unet_2d.py", "unet_2d_blocks.py", "resnet.py", "attention.py", "embeddings.py", "layers.py")


@dataclasses.dataclass
class Instruction:
    """One instruction of XLA's optimized program: what the profiler's op events are named after."""

    name: str
    shape: str  # as the text writes it: "f32[16,32,32,32]{3,2,1,0}"
    opcode: str
    operands: list[str]
    called: str | None  # a fusion's computation
    frames: list[tuple[str, str]]  # (file's base name, function) that made it, innermost first
    op_name: str  # JAX's name for it: "jit(train_step)/jvp()/conv_general_dilated"
    text: str  # the line after "name = ": shape, opcode, operands and attributes (window, dim_labels, ...)


def _table(text: str, title: str) -> dict[int, str]:
    match = re.search(rf"^{title}\n(.*?)(?:\n\n|\Z)", text, re.M | re.S)
    rows = match.group(1).splitlines() if match else []
    return {int(row.split(" ", 1)[0]): row.split(" ", 1)[1] for row in rows if row.strip()}


def _frame_chains(text: str) -> dict[int, list[tuple[str, str]]]:
    """stack_frame_id -> [(file's base name, function), ...] innermost first, from the program's frame tables."""
    files = {i: v.strip('"').rsplit("/", 1)[-1] for i, v in _table(text, "FileNames").items()}
    functions = {i: v.strip('"') for i, v in _table(text, "FunctionNames").items()}
    fields = lambda row: {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", row)}
    locations = {i: fields(v) for i, v in _table(text, "FileLocations").items()}
    frames = {i: fields(v) for i, v in _table(text, "StackFrames").items()}
    # The text writes each parent's id one above its key (a root's parent is itself): shift back where it does.
    shift = 1 if any(f.get("parent_frame_id") == i for i, f in frames.items()) else 0
    chains = {}
    for start in frames:
        chain, seen, frame = [], set(), start
        while frame in frames and frame not in seen:
            seen.add(frame)
            location = locations.get(frames[frame]["file_location_id"], {})
            chain.append(
                (files.get(location.get("file_name_id"), "?"), functions.get(location.get("function_name_id"), "?"))
            )
            frame = frames[frame].get("parent_frame_id", 0) - shift
        chains[start] = chain
    return chains


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*)$")


def parse_program(text: str) -> tuple[dict[str, Instruction], dict[str, list[str]]]:
    """(instructions by name, each computation's opcodes) of an optimized program's text (`compiled.as_text()`)."""
    chains = _frame_chains(text)
    instructions: dict[str, Instruction] = {}
    computations: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if header and not line.startswith(" "):
            current = computations.setdefault(header.group(1), [])
            continue
        match = _INSTRUCTION.match(line)
        if not match or current is None:
            continue
        name, rest = match.groups()
        op = re.search(r"(?:^|\s)([a-z][a-z0-9\-]*)\(", rest)  # the first word before "(": shapes have none
        if not op:
            continue
        called = re.search(r"calls=%([\w.\-]+)", rest)
        frame = re.search(r"stack_frame_id=(\d+)", rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        instructions[name] = Instruction(
            name=name,
            shape=rest[: op.start()].strip(),
            opcode=op.group(1),
            operands=re.findall(r"%([\w.\-]+)", rest[op.end() :].split(")", 1)[0]),
            called=called.group(1) if called else None,
            frames=chains.get(int(frame.group(1)), []) if frame else [],
            op_name=op_name.group(1) if op_name else "",
            text=rest,
        )
        current.append(op.group(1))
    return instructions, computations


def _dims(shape: str) -> list[int]:
    match = re.search(r"\[([\d,]*)\]", shape)
    return [int(d) for d in match.group(1).split(",") if d] if match else []


def conv_flops(instruction: Instruction, instructions: dict[str, Instruction]) -> int:
    """2 x output elements x (kernel elements per output feature) of a convolution instruction; 2 x output elements
    x contracted elements of a product."""
    outputs = 1
    for size in _dims(instruction.shape):
        outputs *= size
    if instruction.opcode == "dot":
        lhs = instructions.get(instruction.operands[0]) if instruction.operands else None
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction.text)
        if lhs is None or not contracting:
            return 0
        dims, inner = _dims(lhs.shape), 1
        for d in contracting.group(1).split(","):
            inner *= dims[int(d)] if d else 1
        return 2 * outputs * inner
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instruction.text)
    kernel = instructions.get(instruction.operands[1]) if len(instruction.operands) > 1 else None
    if not labels or kernel is None:
        return 0
    kernel_dims = dict(zip(labels.group(2), _dims(kernel.shape)))
    per_output = 1
    for label, size in kernel_dims.items():
        if label != "o":
            per_output *= size
    return 2 * outputs * per_output


def jax_part(instruction: Instruction, computations: dict[str, list[str]], conv_inputs: set[str]) -> str:
    """Which part of the step (PARTS) an op of ours belongs to: by what it is, then by the innermost of our model's
    functions that made it (its root's stack frames)."""
    inner = computations.get(instruction.called, []) if instruction.called else []
    if instruction.opcode == "convolution" or "convolution" in inner:
        return "convolutions"
    if instruction.name in conv_inputs and re.search(r"transpose|copy", instruction.name):
        return "conv layout copies"
    model = [(file, function) for file, function in instruction.frames if file in _UNET_FILES]
    innermost = model[0] if model else ("", "")
    if innermost[1].startswith("conv") and (instruction.opcode == "dot" or "dot" in inner):
        return "convolutions"  # a 1x1 convolution XLA made a product, or conv_as_matmul's
    if "GroupNorm" in innermost[1] or "group_norm" in innermost[1] or "silu" in instruction.op_name:
        return "group norm + SiLU"
    if innermost[0] == "attention.py":
        return "attention"
    if instruction.frames and not model:
        return "outside the UNet"
    if instruction.opcode == "dot" or "dot" in inner:
        return "linear layers"
    return "other"


def program_events(data: Any, instructions: dict[str, Instruction]) -> list[tuple[str, int]]:
    """(name, duration ns) of the ops a trace's host threads ran: events named after an instruction of the program,
    outermost only (a loop's or a branch's event holds its body's). XLA:CPU runs some ops on the calling thread,
    among Python's frames, and the rest on its pool's threads: every thread is read."""
    events = []
    for plane in data.planes:
        for line in plane.lines:
            end = -1
            for e in sorted(line.events, key=lambda e: (e.start_ns, -e.duration_ns)):
                if e.name in instructions and e.start_ns >= end:
                    end = e.start_ns + e.duration_ns
                    events.append((e.name, e.duration_ns))
    return events


def jax_profile(run: Callable[[], None], program_text: str, steps: int) -> dict[str, Any]:
    """Our op time per step by part, and the convolutions' FLOPs per step, from `steps` traced calls of `run`."""
    from gpu_check import traced_calls

    instructions, computations = parse_program(program_text)
    conv_inputs = {operand for i in instructions.values() if i.opcode == "convolution" for operand in i.operands}
    flops = sum(
        conv_flops(i, instructions)
        for i in instructions.values()
        if i.opcode in ("convolution", "dot") and jax_part(i, computations, conv_inputs) == "convolutions"
    )
    events = program_events(traced_calls(run, steps), instructions)
    per_op: dict[str, float] = {}
    for name, duration in events:
        per_op[name] = per_op.get(name, 0.0) + duration / 1e6 / steps
    ms = dict.fromkeys(PARTS, 0.0)
    ops = {part: [] for part in PARTS}  # each part's ops, costliest first: (name, ms per step, innermost function)
    for name in sorted(per_op, key=per_op.get, reverse=True):
        instruction = instructions[name]  # program_events keeps only the program's ops
        part = jax_part(instruction, computations, conv_inputs)
        ms[part] += per_op[name]
        ops[part].append((name, per_op[name], next((f"{file}:{fn}" for file, fn in instruction.frames), "-")))
    return {"ms": ms, "ops": ops, "conv_flops": flops, "events": len(events) // steps}


def torch_part(name: str, ancestors: list[str]) -> str:
    """Which part of the step (PARTS) a torch op belongs to, from its name and the ranges it ran in."""
    if any(a == "clip_grad_norm_" or a.startswith("Optimizer.step") for a in ancestors):
        return "outside the UNet"
    if "convolution" in name:
        return "convolutions"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if "group_norm" in name or "silu" in name:
        return "group norm + SiLU"
    if name in ("aten::mm", "aten::addmm", "aten::bmm"):
        return "linear layers"
    return "other"


def torch_profile(step: Callable[[], Any], steps: int) -> dict[str, Any]:
    """torch's op self time per step by part, from `steps` traced steps; its convolutions' FLOPs per step, as
    torch's FlopCounterMode counts them in one more step."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    flops = sum(f for op, f in counter.get_flop_counts().get("Global", {}).items() if "convolution" in str(op))

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ms = dict.fromkeys(PARTS, 0.0)
    for event in prof.events():
        ancestors, parent = [], event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        ms[torch_part(event.name, ancestors)] += event.self_cpu_time_total / 1e3 / steps
    return {"ms": ms, "conv_flops": flops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", choices=list(bench_train_step.MODELS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=None, help="default: the model's")
    parser.add_argument(
        "--steps", type=int, default=3, help="steps traced per side, and as many timed untraced in turns, >= 1"
    )
    parser.add_argument("--isa", default="native", choices=["native", "avx2"], help="limit both sides to AVX2")
    parser.add_argument("--top", type=int, default=0, help="also list our N costliest ops of each part")
    args = parser.parse_args()
    if min(args.steps, args.batch_size) < 1 or args.top < 0:
        parser.error("--steps and --batch-size must be >= 1, --top >= 0")
    cores = len(os.sched_getaffinity(0))
    if cores != 1:
        parser.error(
            f"this process may run on {cores} cores: pin it to one (taskset -c 1 python bench/profile_step.py ...); "
            "with more threads XLA:CPU runs a convolution in its pool after the op's event has ended"
        )
    bench_train_step._set_isa(args.isa)
    from uncond_flax.cpu_runtime import reuse_cpu_memory

    reuse_cpu_memory()  # the trainer's setting
    resolution = args.resolution or bench_train_step.MODELS[args.model]["resolution"]
    config = bench_train_step._config(args.model, args.batch_size, resolution)

    import torch

    torch.set_num_threads(1)
    ours, _ = bench_train_step.jax_side(config, args.batch_size, {})
    theirs, _ = bench_train_step.torch_side(config, args.batch_size)
    for run in (ours, theirs, ours, theirs):  # warm-up
        run()
    times = bench_train_step.interleaved_times({"jax": ours, "torch": theirs}, args.steps)
    seconds = {side: statistics.median(t) for side, t in times.items()}
    mine = jax_profile(ours, ours.compiled.as_text(), args.steps)
    other = torch_profile(theirs, args.steps)

    print(
        f"{args.model} UNet, {resolution} px, batch {args.batch_size}, fp32, one core, isa={args.isa}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; torch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()})"
    )
    print(
        f"step, untraced (median of {args.steps}, the sides taking turns): jax {seconds['jax']:.3f} s, "
        f"torch {seconds['torch']:.3f} s"
    )
    print(f"{'ms per step':<20} {'jax':>9} {'torch':>9}  jax/torch")
    for part in PARTS:
        a, b = mine["ms"][part], other["ms"][part]
        print(f"{part:<20} {a:9.1f} {b:9.1f}  {f'{a / b:.2f}' if b else '-':>9}")
    total_a, total_b = sum(mine["ms"].values()), sum(other["ms"].values())
    print(f"{'all ops':<20} {total_a:9.1f} {total_b:9.1f}  {total_a / total_b:9.2f}")

    def rate(side: dict[str, Any]) -> str:
        seconds = side["ms"]["convolutions"] / 1e3
        return f"{side['conv_flops'] / 1e9:.2f} GFLOP at {side['conv_flops'] / seconds / 1e9:.0f} GFLOP/s"

    print(f"convolutions per step: jax {rate(mine)} (XLA's program), torch {rate(other)} (torch's FlopCounterMode)")
    print(f"jax: {mine['events']} op events per step")
    for part in PARTS if args.top else ():
        for name, ms, made_by in mine["ops"][part][: args.top]:
            print(f"  {part:<20} {ms:7.2f} ms  {name}  ({made_by})")


if __name__ == "__main__":
    main()
