"""DR-LoRA adds no device-to-host transfer (no GPU sync) to forward, backward or a step without
a growth event.

On CPU there is no sync to time, so the test records the *calls* that would wait for a GPU
(`item`, `tolist`, `bool(t)`, `.cpu()`, `.to(device)`, `nonzero`, factories that build host
tensors, ...) made from megatron_drlora's own code (innermost non-torch frame), i.e. it
simulates a model whose device is not the CPU. Megatron's own syncs (e.g. SequentialMLP's
`tokens_per_expert.tolist()`) are not DR-LoRA's and are not counted.
"""

import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_drlora import DRLoRAConfig
from megatron_drlora.controller import DRLoRAController
from tests.tiny import batch, build, randomize_adapters, tiny_args

pytestmark = pytest.mark.usefixtures("megatron_single")

_T = torch.Tensor
# Calls that read a value back to the host (a GPU sync) or have a data-dependent shape.
_SYNCING = {_T.item, _T.tolist, _T.cpu, _T.numpy, _T.__bool__, _T.__float__, _T.__int__,
            _T.__index__, _T.nonzero, torch.nonzero, _T.argwhere, torch.argwhere,
            _T.masked_select, torch.masked_select, _T.unique, torch.unique, _T.cuda}
# Factories that build a host tensor unless given a device (then copied to the GPU).
_FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full,
              torch.arange, torch.rand, torch.randn}
_TORCH_DIR = os.path.dirname(torch.__file__)
_PACKAGE = os.sep + "megatron_drlora" + os.sep


def _drlora_caller():
    """file:line of the innermost frame outside torch and this file, if it is DR-LoRA's."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(_TORCH_DIR) and name != __file__:
            return f"{name.split(_PACKAGE)[-1]}:{frame.f_lineno}" if _PACKAGE in name else None
        frame = frame.f_back
    return None


def _moves_device(args, kwargs) -> bool:
    return "device" in kwargs or any(isinstance(a, (str, torch.device, torch.Tensor))
                                     for a in args[1:])


class HostSyncRecorder(TorchFunctionMode):
    """Records DR-LoRA's host-syncing calls (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNCING:
            reason = func.__name__
        elif func is _T.to and _moves_device(args, kwargs):
            reason = "to(device)"
        elif func is _T.copy_ and args[0].device != args[1].device:
            reason = "copy_ across devices"
        elif func in _FACTORIES and "device" not in kwargs:
            reason = f"{func.__name__} on the host"
        else:
            reason = None
        if reason is not None:
            where = _drlora_caller()
            if where is not None:
                self.calls.append(f"{reason} at {where}")
        return func(*args, **kwargs)


class ScalarReadRecorder(TorchDispatchMode):
    """The same at the ATen level: any scalar read or data-dependent shape from DR-LoRA."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero):
            where = _drlora_caller()
            if where is not None:
                self.calls.append(f"aten.{packet.__name__} at {where}")
        return func(*args, **(kwargs or {}))


class _Record:
    def __enter__(self):
        self.functions = HostSyncRecorder()
        self.dispatch = ScalarReadRecorder(self.functions.calls)
        self.functions.__enter__()
        self.dispatch.__enter__()
        return self.functions.calls

    def __exit__(self, *exc):
        self.dispatch.__exit__(*exc)
        self.functions.__exit__(*exc)


def test_recorder_sees_the_old_host_copies():
    """Not vacuous: the calls the old routing hook made, run as DR-LoRA code, are recorded."""
    from megatron_drlora import statistics

    code = compile("probs.sum(0).to('cpu', torch.float64); probs.sum().item(); torch.zeros(2)",
                   statistics.__file__, "exec")
    with _Record() as calls:
        exec(code, {"probs": torch.rand(4, 3), "torch": torch})
    assert [c.split(" at ")[0] for c in calls] == [
        "to(device)", "item", "aten._local_scalar_dense", "zeros on the host"], calls


def _step(model, args, step, calls_by_phase, controller, record):
    tokens, pos, labels = batch(args, batch_size=4, seed=step)
    for p in model.parameters():
        p.grad = None
    phases = {}

    def run(name, fn):
        if record:
            with _Record() as calls:
                out = fn()
            phases[name] = list(calls)
        else:
            out = fn()
        return out

    loss = run("forward", lambda: model(tokens, pos, None, labels=labels).float().mean())
    run("backward", loss.backward)
    run("collect", lambda: controller.collect(step))
    report = run("finish", lambda: controller.finish(step, stepped=True))
    if record:
        calls_by_phase[step] = phases
    return report


@pytest.mark.parametrize("variant", ["full", "frequency", "rank_pool"])
def test_no_host_transfers_in_forward_backward_and_non_event_steps(variant):
    args = tiny_args()
    cfg = DRLoRAConfig(budget=8, grow_interval=3, grow_buffer=0, warmup_iters=2,
                       saliency="full" if variant == "rank_pool" else variant,
                       rank_pool=variant == "rank_pool")
    chunks, handle = build(args, cfg)
    randomize_adapters(handle)
    controller = DRLoRAController(handle, train_iters=12, warmup_iters=None)
    events = controller.schedule.event_steps()
    assert events[:2] == [2, 5]
    recorded = {}
    reports = {}
    for step in range(7):
        # step 0 builds what is built once; 1 (router frozen), 3, 4 and 6 are recorded
        record = step not in events and step != 0
        reports[step] = _step(chunks[0], args, step, recorded, controller, record)
    assert sorted(recorded) == [1, 3, 4, 6]
    assert [s for s, r in reports.items() if r.event] == [2, 5]
    syncs = {(step, phase): calls for step, phases in recorded.items()
             for phase, calls in phases.items() if calls}
    assert syncs == {}, f"DR-LoRA host transfers: {syncs}"
    # the statistics were really gathered and entered the EMAs (lazily checked finite)
    assert reports[6].dropped == "" and controller.saliency.updates == 7
    assert controller.saliency.frequency.sum() > 0


def test_state_dict_is_on_the_host_and_loads_back_onto_the_emas_device():
    from megatron_drlora.saliency import SaliencyState

    s = SaliencyState(2, 3, 1, 4)
    s.update(torch.rand(2, 3), torch.tensor([5.0, 6.0]), torch.rand(2, 3, 1, 4),
             torch.rand(2, 3, 1, 4), torch.full((2, 3, 1), 2), 0.5)
    sd = s.state_dict()
    assert all(t.device.type == "cpu" for t in sd.values())
    assert sd["frequency"].data_ptr() != s.frequency.data_ptr()  # a copy, not the EMA itself
    t = SaliencyState(2, 3, 1, 4)
    t.load_state_dict(sd)
    assert torch.equal(t.frequency, s.frequency) and t.updates == 1
