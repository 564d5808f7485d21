"""The source text ``mx.fast.metal_kernel`` compiles, and a C++ launcher for it.

The checker gets MLX's own text where it can: MLX prints the generated source when called with
``verbose=True``, and on a machine without Metal it generates it while ``mx.export_function``
traces the call (see check_kernels.mlx_generated_source). ``render`` rebuilds the same text from
the same arguments (mirroring mlx/fast.cpp ``write_signature``/``write_template`` of MLX 0.32)
for MLX versions that do not print it; tests/test_kernels.py checks that both agree:

    <header>
    template <typename T, int D>            # only with template arguments, in the given order
    [[kernel]] void custom_kernel_<name>_<template hash>_<input types>_<output types>(
      const device float* q [[buffer(0)]],  # each input; `constant` when it has < 8 elements,
      const constant int* q_shape [[buffer(1)]],   # `&` for 0-d; *_shape/_strides/_ndim only
      ...                                           # when the body mentions them
      device float* out [[buffer(n)]],      # each output
      uint3 threadgroup_position_in_grid [[threadgroup_position_in_grid]],  # attributes the body
      ...) {                                                               # mentions, fixed order
    <body>
    }
    template [[host_name("custom_kernel_...")]] [[kernel]] decltype(f<...>) f<...>;

``launcher`` parses the parameter list of that text and writes a main() that passes, in the
signature's order, the case file's buffers, their shapes, the outputs and each thread's attributes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Attributes MLX declares when their name occurs anywhere in the body, in MLX's order.
METAL_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)

MAX_CONSTANT_ARRAY_SIZE = 8

# MLX dtype name -> Metal type string (get_type_string) and the shim's dtype code.
TYPE_STRINGS = {"float32": "float", "float16": "float16_t", "bfloat16": "bfloat16_t", "int32": "int32_t"}
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2, "int32": 3}


def dtype_name(dtype) -> str:
    """'float32' for mx.float32 (or a string already)."""
    name = dtype if isinstance(dtype, str) else str(dtype).rsplit(".", 1)[-1]
    if name not in TYPE_STRINGS:
        raise ValueError(f"dtype {dtype} is not modelled by the shim")
    return name


@dataclass(frozen=True)
class ArrayInfo:
    """What the signature depends on for one input: dtype, rank and element count."""

    dtype: str
    ndim: int
    size: int


def shape_infos(source: str, input_names) -> list[tuple[bool, bool, bool]]:
    return [(f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source) for n in input_names]


def attributes(source: str) -> list[tuple[str, str]]:
    return [(name, typ) for name, typ in METAL_ATTRIBUTES if name in source]


def template_value(value) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return TYPE_STRINGS[dtype_name(value)]


def template_kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    return "typename"


def template_def(template) -> str:
    return "<" + ", ".join(template_value(v) for _, v in template) + ">"


def kernel_name(name: str, template, inputs: list[ArrayInfo], output_dtypes) -> str:
    """custom_kernel_<name>, MLX's template hash, then each input's and output's type."""
    out = f"custom_kernel_{name}"
    if template:
        out += "_" + re.sub(r"<|>|(, )", "_", template_def(template))[:-1]
    for arr in inputs:
        out += "_" + TYPE_STRINGS[arr.dtype]
        if arr.ndim == 0:
            out += "s"
        elif arr.size < MAX_CONSTANT_ARRAY_SIZE:
            out += "c"
    for dt in output_dtypes:
        out += "_" + TYPE_STRINGS[dtype_name(dt)]
    return out


def render(
    *,
    name: str,
    input_names,
    inputs: list[ArrayInfo],
    output_names,
    output_dtypes,
    source: str,
    header: str = "",
    template=(),
    atomic_outputs: bool = False,
) -> str:
    """The full Metal source MLX would compile for this call."""
    fname = kernel_name(name, template, inputs, output_dtypes)
    infos = shape_infos(source, input_names)
    attrs = [f"  {typ} {attr} [[{attr}]]" for attr, typ in attributes(source)]
    out = header
    if template:
        out += "template <" + ", ".join(f"{template_kind(v)} {k}" for k, v in template) + ">\n"
    out += f"[[kernel]] void {fname}(\n"
    index = 0
    for n, arr, (has_shape, has_strides, has_ndim) in zip(input_names, inputs, infos):
        location = "constant" if arr.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if arr.ndim == 0 else "*"
        out += f"  const {location} {TYPE_STRINGS[arr.dtype]}{ref} {n} [[buffer({index})]],\n"
        index += 1
        if arr.ndim > 0:
            if has_shape:
                out += f"  const constant int* {n}_shape [[buffer({index})]],\n"
                index += 1
            if has_strides:
                out += f"  const constant int64_t* {n}_strides [[buffer({index})]],\n"
                index += 1
            if has_ndim:
                out += f"  const constant int& {n}_ndim [[buffer({index})]],\n"
                index += 1
    n_in, n_out = len(inputs), len(output_names)
    for n, dt in zip(output_names, output_dtypes):
        typ = TYPE_STRINGS[dtype_name(dt)]
        if atomic_outputs:
            typ = f"atomic<{typ}>"
        out += f"  device {typ}* {n} [[buffer({index})]]"
        # MLX's condition, verbatim (index also counts shape buffers).
        out += ",\n" if (index < n_in + n_out - 1 or attrs) else ") {\n"
        index += 1
    for i, a in enumerate(attrs):
        out += a + (",\n" if i < len(attrs) - 1 else ") {\n")
    out += source
    out += "\n}\n"
    if template:
        tdef = fname + template_def(template)
        out += f'\ntemplate [[host_name("{fname}")]] [[kernel]] decltype({tdef}) {tdef};\n'
    return out


def parse_signature(text: str) -> tuple[str, list[str]]:
    """(expression to call, parameter names in order) of the kernel in a generated source."""
    m = re.search(r"\[\[kernel\]\] void (\w+)\(\n(.*?)\) \{\n", text, flags=re.DOTALL)
    if not m:
        raise ValueError("no [[kernel]] signature in the generated source")
    fname, plist = m.group(1), m.group(2)
    params = [re.search(r"(\w+)\s*\[\[", p).group(1) for p in plist.split(",\n")]
    inst = re.search(r"decltype\((" + re.escape(fname) + r"<[^>]*>)\)", text)
    return (inst.group(1) if inst else fname), params


def launcher(text: str, *, input_names, inputs: list[ArrayInfo], output_names, output_dtypes) -> str:
    """A C++ main() for the shim: reads a case file, calls the kernel on every thread, writes outputs."""
    call, params = parse_signature(text)
    attr_names = {a for a, _ in METAL_ATTRIBUTES}
    lines = ["", "int main(int argc, char** argv) {",
             '  if (argc != 3) shim::fail("usage: %s CASE OUT", argv[0]);',
             "  shim::Case c = shim::read_case(argv[1]);"]
    where = {}
    for i, (n, arr) in enumerate(zip(input_names, inputs)):
        ctype = TYPE_STRINGS[arr.dtype]
        lines.append(f'  shim::expect_dtype(c, true, {i}, {DTYPE_CODES[arr.dtype]}, "{n}");')
        lines.append(f"  const {ctype}* in_{i} = c.inputs[{i}].as<{ctype}>();")
        where[n] = f"*in_{i}" if arr.ndim == 0 else f"in_{i}"
        where[f"{n}_shape"] = f"c.inputs[{i}].shape.data()"
        where[f"{n}_strides"] = f"c.inputs[{i}].strides.data()"
        where[f"{n}_ndim"] = f"c.inputs[{i}].ndim"
    for i, (n, dt) in enumerate(zip(output_names, output_dtypes)):
        dn = dtype_name(dt)
        ctype = TYPE_STRINGS[dn]
        lines.append(f'  shim::expect_dtype(c, false, {i}, {DTYPE_CODES[dn]}, "{n}");')
        lines.append(f"  {ctype}* out_{i} = c.outputs[{i}].as<{ctype}>();")
        where[n] = f"out_{i}"
    for p in attr_names:
        where[p] = f"t.{p}"
    missing = [p for p in params if p not in where]
    if missing:
        raise ValueError(f"signature parameters the launcher cannot supply: {missing}")
    lines.append("  long switches = shim::run_grid(c, [&](const shim::Lane& t) {")
    lines.append(f"    {call}(" + ", ".join(where[p] for p in params) + ");")
    lines.append("  });")
    lines.append("  shim::write_outputs(c, argv[2], switches);")
    lines.append("  return 0;")
    lines.append("}")
    return "\n".join(lines) + "\n"
