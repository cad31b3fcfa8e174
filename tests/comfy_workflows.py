"""The example workflows: API-format sources (example_workflows/api/) and the UI-format files ComfyUI's template
browser opens (example_workflows/*.json), converted by the frontend's rules against a live server's node list.

UI rules used: widget values in input order (required, then optional), one extra "control after generate"
value after an INT widget that declares it; socket inputs listed in order, then widgets fed by a link; links
as [id, from node, from slot, to node, to slot, type].

    python -m calibrated_samplers.tests.comfy_workflows http://127.0.0.1:8188   # rewrite the UI files

The template browser shows a custom node's template by its file name and ``<file name>.jpg`` as its picture, so
the UI files are named by ``TITLES``; ``LAYOUT`` places the nodes (x, y, width, height, title) so that no link
runs behind a node.
"""
import json
import os
import sys
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "example_workflows")
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
TITLES = {"calibrate_then_sample": "Calibrate then sample - SD1.5",
          "flow_model_calibrate_and_sample": "Calibrate then sample - SD3.5 (flow model)",
          "ksampler_with_saved_calibration": "KSampler with a saved calibration - SD1.5"}
_SAMPLING = {  # the shared right half: noise and latent under the sampler, the decode up in the VAE's lane
    "10": (820, 170, 340, 110, "CFG (the calibrated cfg)"), "3": (1600, 170, 320, 130, "Sample"),
    "8": (1980, 40, 240, 70, None), "9": (2260, 40, 420, 460, None),
    "21": (1220, 330, 340, 110, "Sampler from this calibration"), "22": (1220, 480, 340, 300, "Held-out error per step"),
    "13": (1220, 830, 340, 110, None), "6": (420, 420, 340, 180, "Prompt"), "7": (420, 650, 340, 180, "Negative prompt"),
    "20": (820, 330, 360, 640, "Fit calibration (runs once)")}
LAYOUT = {
    "calibrate_then_sample": dict(_SAMPLING, **{"4": (40, 40, 320, 100, None), "5": (1220, 990, 340, 110, None)}),
    "flow_model_calibrate_and_sample": dict(_SAMPLING, **{
        "16": (40, 40, 320, 60, None), "1": (40, 170, 320, 90, None), "14": (420, 170, 340, 60, None),
        "2": (40, 330, 320, 110, "Text encoders (SD3: clip_l, clip_g, t5xxl)"), "5": (1220, 990, 340, 110, None)}),
    "ksampler_with_saved_calibration": {
        "4": (40, 40, 320, 100, None), "6": (420, 260, 340, 180, "Prompt"), "7": (420, 490, 340, 180, "Negative prompt"),
        "5": (420, 720, 340, 110, None), "3": (820, 170, 340, 270, "KSampler (the saved file's settings)"),
        "8": (1220, 40, 240, 70, None), "9": (1500, 40, 420, 460, None)},
}


def ui_path(name):
    return os.path.join(EXAMPLES, TITLES[name] + ".json")


def object_info(server):
    with urllib.request.urlopen(server.rstrip("/") + "/object_info", timeout=60) as r:
        return json.load(r)


def specs(info):
    """[(name, type, options, is_widget)] of a node's inputs in the order the frontend lays them out."""
    out = []
    for group in ("required", "optional"):
        for name, spec in info["input"].get(group, {}).items():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            kind = "COMBO" if isinstance(kind, list) else kind
            out.append((name, kind, opts, kind in WIDGETS))
    return out


def _default(kind, spec, opts):
    if "default" in opts:
        return opts["default"]
    if kind == "COMBO":
        options = spec if isinstance(spec, list) else opts.get("options", [])
        return options[0] if options else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


def api_to_ui(api, info, layout=None):
    ids = sorted(api, key=int)
    depth = {}

    def level(nid):
        if nid not in depth:
            ups = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((level(u) for u in ups), default=-1)
        return depth[nid]
    rows = {}
    nodes, links, out_links = [], [], {}
    for order, nid in enumerate(sorted(ids, key=lambda n: (level(n), int(n)))):
        node = api[nid]
        node_info = info[node["class_type"]]
        raw = {n: s for g in ("required", "optional") for n, s in node_info["input"].get(g, {}).items()}
        inputs, widgets = [], []
        for name, kind, opts, is_widget in specs(node_info):
            value = node["inputs"].get(name)
            linked = isinstance(value, list)
            if linked:
                link_id = len(links) + 1
                src, slot = value
                links.append([link_id, int(src), slot, int(nid), len(inputs), info[api[src]["class_type"]]["output"][slot]])
                out_links.setdefault((src, slot), []).append(link_id)
            if not is_widget or linked:
                entry = {"name": name, "type": kind, "link": link_id if linked else None}
                if is_widget:
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            if is_widget:
                widgets.append(value if value is not None and not linked else _default(kind, raw[name][0], opts))
                if kind == "INT" and opts.get("control_after_generate"):
                    widgets.append("fixed")
        col = level(nid)
        rows[col] = rows.get(col, 0) + 1
        x, y, w, h, title = (layout or {}).get(nid, (40 + 380 * col, 40 + 260 * (rows[col] - 1), 340, 220, None))
        nodes.append({"id": int(nid), "type": node["class_type"], "pos": [x, y], "size": [w, h], "flags": {},
                      "order": order, "mode": 0, "inputs": inputs, "outputs": [],
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets})
        if title:
            nodes[-1]["title"] = title
    for n in nodes:
        node_info = info[n["type"]]
        names = node_info.get("output_name") or node_info["output"]
        n["outputs"] = [{"name": names[i], "type": t, "links": out_links.get((str(n["id"]), i), []), "slot_index": i}
                        for i, t in enumerate(node_info["output"])]
    nodes.sort(key=lambda n: n["id"])
    return {"last_node_id": max(int(i) for i in ids), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def ui_to_api(ui, info):
    """The API-format prompt the frontend would queue for a UI-format workflow (the inverse of api_to_ui)."""
    by_link = {link[0]: link for link in ui["links"]}
    api = {}
    for n in ui["nodes"]:
        inputs = {}
        for entry in n["inputs"]:
            if entry.get("link") is not None:
                _, src, slot, *_ = by_link[entry["link"]]
                inputs[entry["name"]] = [str(src), slot]
        values = list(n["widgets_values"])
        for name, kind, opts, is_widget in specs(info[n["type"]]):
            if not is_widget:
                continue
            value = values.pop(0)
            if kind == "INT" and opts.get("control_after_generate"):
                values.pop(0)
            inputs.setdefault(name, value)
        if values:
            raise ValueError(f"node {n['id']} ({n['type']}) has {len(values)} widget values too many")
        api[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return api


def sources():
    folder = os.path.join(EXAMPLES, "api")
    return {f[:-5]: json.load(open(os.path.join(folder, f))) for f in sorted(os.listdir(folder)) if f.endswith(".json")}


def main(server):
    info = object_info(server)
    for name, api in sources().items():
        with open(ui_path(name), "w") as f:
            json.dump(api_to_ui(api, info, LAYOUT.get(name)), f, indent=1)
            f.write("\n")
        print("wrote", ui_path(name))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8188")
