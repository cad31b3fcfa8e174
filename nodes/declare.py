"""One declaration per node, built as a V3 node where ComfyUI has ``comfy_api.latest`` and as a classic one otherwise.

A node is its inputs, outputs and a plain function; ``build`` turns it into the class ComfyUI registers.
Combo options may be a callable, re-read whenever ComfyUI asks for the node's inputs (file lists stay fresh).
"""
WIDGETS = ("INT", "FLOAT", "BOOLEAN", "STRING")


class In:
    """One input: a socket type (MODEL, SIGMAS...), a widget type (INT, FLOAT, BOOLEAN, STRING) or a combo."""

    def __init__(self, name, kind, default=None, optional=False, tooltip=None, options=None, **limits):
        self.name, self.kind, self.default, self.optional, self.tooltip = name, kind, default, optional, tooltip
        self.options, self.limits = options, limits  # options: list or callable, for kind "COMBO"

    def choices(self):
        return list(self.options() if callable(self.options) else self.options)

    def classic(self):
        extra = {k: v for k, v in dict(default=self.default, tooltip=self.tooltip, **self.limits).items() if v is not None}
        kind = self.choices() if self.kind == "COMBO" else self.kind
        return (kind, extra) if extra else (kind,)

    def v3(self, io, custom):
        common = dict(optional=self.optional, tooltip=self.tooltip)
        if self.kind == "COMBO":
            return io.Combo.Input(self.name, options=self.choices(), default=self.default, **common)
        if self.kind in WIDGETS:
            cls = {"INT": io.Int, "FLOAT": io.Float, "BOOLEAN": io.Boolean, "STRING": io.String}[self.kind]
            return cls.Input(self.name, default=self.default, **common, **self.limits)
        return socket_type(io, custom, self.kind).Input(self.name, **common)


class Node:
    def __init__(self, node_id, display_name, category, description, inputs, outputs, run, output_node=False):
        self.node_id, self.display_name, self.category, self.description = node_id, display_name, category, description
        self.inputs, self.outputs, self.run, self.output_node = inputs, outputs, run, output_node


def socket_type(io, custom, kind):
    known = {"MODEL": "Model", "CONDITIONING": "Conditioning", "LATENT": "Latent", "SIGMAS": "Sigmas",
             "SAMPLER": "Sampler", "IMAGE": "Image"}
    if kind in known:
        return getattr(io, known[kind])
    if kind not in custom:
        custom[kind] = io.Custom(kind)
    return custom[kind]


def classic(node):
    """A classic (V1) node class: INPUT_TYPES, RETURN_TYPES, FUNCTION."""
    def input_types(cls):
        groups = {"required": {}, "optional": {}}
        for i in node.inputs:
            groups["optional" if i.optional else "required"][i.name] = i.classic()
        return groups if groups["optional"] else {"required": groups["required"]}

    def run(self, **kwargs):
        return tuple(node.run(**kwargs))

    return type(node.node_id, (), {
        "INPUT_TYPES": classmethod(input_types), "RETURN_TYPES": tuple(t for t, _ in node.outputs),
        "RETURN_NAMES": tuple(n for _, n in node.outputs), "FUNCTION": "run", "CATEGORY": node.category,
        "DESCRIPTION": node.description, "OUTPUT_NODE": node.output_node, "run": run})


def v3(node, io, custom):
    """A V3 node class (``comfy_api.latest.io.ComfyNode``)."""
    def define_schema(cls):
        return io.Schema(node_id=node.node_id, display_name=node.display_name, category=node.category,
                         description=node.description, is_output_node=node.output_node,
                         inputs=[i.v3(io, custom) for i in node.inputs],
                         outputs=[socket_type(io, custom, t).Output(display_name=n) for t, n in node.outputs])

    def execute(cls, **kwargs):
        return io.NodeOutput(*node.run(**kwargs))

    return type(node.node_id, (io.ComfyNode,), {"define_schema": classmethod(define_schema),
                                                 "execute": classmethod(execute)})


def v3_api():
    """ComfyUI's V3 ``io`` module, or None on a ComfyUI that predates it."""
    try:
        from comfy_api.latest import io
    except ImportError:
        return None
    return io if hasattr(io, "ComfyNode") else None


def build(nodes, io=None):
    """NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS for ``nodes``: V3 classes when ``io`` is given."""
    custom = {}
    classes = {n.node_id: (v3(n, io, custom) if io is not None else classic(n)) for n in nodes}
    return classes, {n.node_id: n.display_name for n in nodes}
