import jax
import pytest

from ckptconv.errors import ShardingError
from ckptconv.sharding import make_mesh, parse_mesh_spec


def test_make_mesh_from_text():
    mesh = make_mesh("data=2,tensor=4")
    assert dict(mesh.shape) == {"data": 2, "tensor": 4}
    assert mesh.axis_names == ("data", "tensor")
    assert mesh.devices.size == jax.device_count() == 8
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}


def test_make_mesh_from_dict_and_whitespace():
    assert dict(make_mesh({"fsdp": 4, "tensor": 2}).shape) == {"fsdp": 4, "tensor": 2}
    assert dict(make_mesh(" fsdp = 1 , tensor=8 ").shape) == {"fsdp": 1, "tensor": 8}
    assert dict(make_mesh("tensor=8").shape) == {"tensor": 8}


def test_make_mesh_infers_minus_one():
    assert dict(make_mesh("data=2,tensor=-1").shape) == {"data": 2, "tensor": 4}


def test_make_mesh_on_given_devices():
    devices = jax.devices()[:4]
    mesh = make_mesh("data=2,tensor=2", devices=devices)
    assert set(mesh.devices.flat) == set(devices)


def test_make_mesh_axis_types():
    explicit = jax.sharding.AxisType.Explicit
    mesh = make_mesh("data=2,tensor=4", axis_types=(explicit, explicit))
    assert mesh.axis_types == (explicit, explicit)
    with pytest.raises(ShardingError, match="2 axes but 1 axis types"):
        make_mesh("data=2,tensor=4", axis_types=(explicit,))


@pytest.mark.parametrize(
    "spec, match",
    [
        ("data=2,tensor=2", "needs 4 devices, but 8 are available"),
        ({"data": 3}, "needs 3 devices, but 8 are available"),
        ("data=3,tensor=-1", "not divisible by 3"),
        ("data=2;tensor=4", "malformed mesh spec"),
        ("data:2", "malformed mesh spec"),
        ("data=two", "malformed mesh spec"),
        ("data=2,", "malformed mesh spec"),
        ("2=data", "malformed mesh spec"),
        ("", "empty mesh spec"),
        ("data=2,data=4", "'data' occurs twice"),
        ("data=0,tensor=8", "size 0"),
        ({"data": 2.0, "tensor": 4}, "size 2.0"),
        ("data=-1,tensor=-1", "at most one axis"),
        (8, "a mesh spec is"),
    ],
)
def test_make_mesh_errors_are_one_line(spec, match):
    with pytest.raises(ShardingError, match=match) as info:
        make_mesh(spec)
    assert "\n" not in str(info.value)


def test_parse_mesh_spec_keeps_order():
    assert list(parse_mesh_spec("tensor=4,data=2")) == ["tensor", "data"]
