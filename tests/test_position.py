"""The trainer's log-interval sums (capsgan_toolkit.training.state.Position): floats and device tensors alike."""

from __future__ import annotations

import json

import torch

from capsgan_toolkit.training.state import Position, encoder_diagnostics


def test_tensor_values_sum_exactly_as_python_floats_and_checkpoint_as_floats():
    values = torch.rand(50, generator=torch.Generator().manual_seed(0))  # float32, as a model's diagnostics
    floats, tensors = Position(0.9), Position(0.9)
    for v in values:
        floats.add("capsule_len", float(v))
        tensors.add("capsule_len", v)  # a 0-d tensor: summed in float64 where it is, read once
    assert isinstance(tensors.interval["sums"]["capsule_len"], torch.Tensor)
    assert tensors.means() == floats.means()  # float64 sums of the same float32 values: equal bit for bit
    assert tensors.means()["capsule_len"] == sum(float(v) for v in values) / 50
    state = tensors.state_dict()
    json.dumps(state["interval"])  # plain numbers in a checkpoint, no tensors
    assert state["interval"] == floats.state_dict()["interval"]
    restored = Position(0.9)
    restored.load_state_dict(state)
    restored.add("capsule_len", values[0])
    floats.add("capsule_len", float(values[0]))
    assert restored.means() == floats.means()


def test_encoder_diagnostics_prefers_device_values_and_falls_back_to_the_contract():
    class Contract:
        diagnostics = {"capsule_len": 0.5}

    class Device(Contract):
        def device_diagnostics(self):
            return {"capsule_len": torch.tensor(0.5)}

    assert encoder_diagnostics(None) is None
    assert encoder_diagnostics(Contract()) == {"capsule_len": 0.5}
    assert isinstance(encoder_diagnostics(Device())["capsule_len"], torch.Tensor)
    assert encoder_diagnostics(object()) is None
