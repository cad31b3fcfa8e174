"""Real ComfyUI and web UI (Forge, AUTOMATIC1111) servers for the integration tests, started with this checkout
installed into a temporary base/data directory (your installs are only read: their models are linked, nothing is
written).

ComfyUI: COMFYUI_DIR (a ComfyUI checkout) and COMFYUI_PYTHON (the Python that runs it).
Forge: FORGE_DIR (a stable-diffusion-webui-forge checkout, prepared so that ``launch.py
--skip-prepare-environment`` starts), FORGE_PYTHON, and FORGE_CKPT (an SD1.5 checkpoint file).
AUTOMATIC1111: A1111_DIR (a stable-diffusion-webui checkout with its ``repositories/``, prepared the same way),
A1111_PYTHON, A1111_CKPT (an SD1.5 checkpoint; a tiny one needs its model yaml beside it) and, offline,
A1111_HF_HOME (a Hugging Face cache with the CLIP-L tokenizer and config; given to it as HF_HOME).
"""
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFY = os.environ.get("COMFYUI_DIR")
COMFY_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
FORGE = os.environ.get("FORGE_DIR")
FORGE_PYTHON = os.environ.get("FORGE_PYTHON", sys.executable)
FORGE_CKPT = os.environ.get("FORGE_CKPT")
A1111 = os.environ.get("A1111_DIR")
A1111_PYTHON = os.environ.get("A1111_PYTHON", sys.executable)
A1111_CKPT = os.environ.get("A1111_CKPT")
A1111_HF_HOME = os.environ.get("A1111_HF_HOME")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url, base, log, proc):
        self.url, self.base, self.log, self.proc = url, base, log, proc

    def http(self, method, path, body=None, timeout=60):
        req = urllib.request.Request(self.url + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def log_since(self, offset):
        with open(self.log, errors="replace") as f:
            f.seek(offset)
            return f.read()

    def wait_up(self, path, limit=300):
        def answers():
            try:
                return self.http("GET", path, timeout=5)[0] == 200
            except OSError:
                return False
        self.wait_for(answers, "server did not start", limit)

    def wait_for(self, ready, failure, limit=300):
        """Until ``ready()``; where the server exits or ``limit`` seconds pass first, stop it and raise ``failure``
        with its log's tail."""
        t0 = time.time()
        while not ready():
            if self.proc.poll() is not None or time.time() - t0 > limit:
                self.stop()
                raise RuntimeError(f"{failure}; log tail:\n{self.log_since(0)[-4000:]}")
            time.sleep(0.5)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def link_models(src_models, dst_models, extra_checkpoints=()):
    """dst_models/<sub> -> src_models/<sub>, except checkpoints (a real folder of links, plus extras) and a
    fresh calibrated_samplers folder."""
    os.makedirs(dst_models)
    for sub in os.listdir(src_models):
        src = os.path.join(src_models, sub)
        if sub in ("calibrated_samplers", "checkpoints") or not os.path.isdir(src):
            continue
        os.symlink(src, os.path.join(dst_models, sub))
    ckpts = os.path.join(dst_models, "checkpoints")
    os.makedirs(ckpts)
    src_ckpts = os.path.join(src_models, "checkpoints")
    for f in (os.listdir(src_ckpts) if os.path.isdir(src_ckpts) else []):
        os.symlink(os.path.join(src_ckpts, f), os.path.join(ckpts, f))
    for path in extra_checkpoints:
        if not os.path.exists(os.path.join(ckpts, os.path.basename(path))):
            os.symlink(path, os.path.join(ckpts, os.path.basename(path)))


WS_LISTENER = """
import asyncio, json, sys
import aiohttp

async def main(url, client_id, event):
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{url}?clientId={client_id}") as ws:
            print("connected", flush=True)
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(msg.data)
                    if data.get("type") == event:
                        print(json.dumps(data["data"]), flush=True)

asyncio.run(main(*sys.argv[1:]))
"""


class Comfy(Server):
    @classmethod
    def start(cls, base, extra_checkpoints=()):
        os.makedirs(os.path.join(base, "custom_nodes"))
        os.symlink(ROOT, os.path.join(base, "custom_nodes", "calibrated_samplers"))
        link_models(os.path.join(COMFY, "models"), os.path.join(base, "models"), extra_checkpoints)
        port, log = free_port(), os.path.join(base, "comfyui.log")
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("COMFY_THREADS", "2"))
        with open(log, "w") as out:
            proc = subprocess.Popen([COMFY_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                     "--disable-auto-launch", "--disable-api-nodes", "--base-directory", base],
                                    cwd=COMFY, stdout=out, stderr=subprocess.STDOUT, env=env)
        server = cls(f"http://127.0.0.1:{port}", base, log, proc)
        server.folder = os.path.join(base, "models", "calibrated_samplers")
        server.wait_up("/system_stats")
        return server

    def queue(self, prompt, client_id=None):
        status, raw = self.http("POST", "/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})
        body = json.loads(raw)
        if status != 200:
            raise AssertionError(f"validation failed: {json.dumps(body, indent=1)[:3000]}")
        return body["prompt_id"]

    def wait(self, prompt_id, timeout=900):
        t0 = time.time()
        while time.time() - t0 < timeout:
            hist = json.loads(self.http("GET", f"/history/{prompt_id}")[1])
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                return hist[prompt_id]
            time.sleep(0.3)
        self.http("POST", "/interrupt")
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout}s")

    def run(self, prompt, client_id=None):
        start = os.path.getsize(self.log)
        entry = self.wait(self.queue(prompt, client_id))
        entry["log"] = self.log_since(start)
        return entry

    def run_watched(self, prompt, event):
        """Run ``prompt`` as a browser would, connected to the server's websocket; also returns the ``event``
        messages that browser received (read by ComfyUI's own Python with aiohttp, a ComfyUI requirement)."""
        client_id = uuid.uuid4().hex
        listener = subprocess.Popen([COMFY_PYTHON, "-c", WS_LISTENER, self.url.replace("http", "ws", 1) + "/ws",
                                     client_id, event], stdout=subprocess.PIPE, text=True)
        try:
            ready = listener.stdout.readline()
            assert ready.strip() == "connected", ready
            entry = self.run(prompt, client_id)
            time.sleep(1.0)  # messages are sent from the server's loop after the node returns
        finally:
            listener.terminate()
        out = listener.communicate(timeout=30)[0]
        return entry, [json.loads(line) for line in out.splitlines() if line.strip()]

    def image(self, entry, node):
        img = entry["outputs"][node]["images"][0]
        _, raw = self.http("GET", f"/view?filename={img['filename']}&subfolder={img['subfolder']}&type={img['type']}")
        return decode_png(raw)


def comfy_error(entry):
    for kind, data in entry["status"].get("messages", []):
        if kind in ("execution_error", "execution_interrupted"):
            return kind, data
    return None, None


class WebUI(Server):
    """A real web UI, API only: ``kind`` "forge" (FORGE_*) or "a1111" (A1111_*); both are SD1.5 on the CPU."""
    CLIENTS = {"forge": {"dir": FORGE, "python": FORGE_PYTHON, "ckpt": FORGE_CKPT},
               "a1111": {"dir": A1111, "python": A1111_PYTHON, "ckpt": A1111_CKPT}}

    @classmethod
    def available(cls, kind):
        return bool(cls.CLIENTS[kind]["dir"] and cls.CLIENTS[kind]["ckpt"])

    @classmethod
    def python(cls, kind):
        return cls.CLIENTS[kind]["python"]

    @classmethod
    def start(cls, kind, base):
        os.makedirs(os.path.join(base, "extensions"))
        os.symlink(ROOT, os.path.join(base, "extensions", "calibrated_samplers"))
        os.makedirs(os.path.join(base, "models", "Stable-diffusion"))
        port, log = free_port(), os.path.join(base, f"{kind}.log")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
                   DO_NOT_TRACK="1")
        args = ["--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-python-version-check",
                "--skip-version-check", "--no-download-sd-model", "--use-cpu", "all", "--disable-nan-check",
                "--nowebui", "--server-name", "127.0.0.1", "--port", str(port), "--data-dir", base]
        client = cls.CLIENTS[kind]
        args += ["--ckpt", client["ckpt"]]
        if kind == "forge":
            args.append("--always-cpu")
        else:  # A1111 halves the weights unless told, and its CPU has no half-precision kernels for all of them
            args += ["--no-half", "--precision", "full"]
            if A1111_HF_HOME:
                env["HF_HOME"] = A1111_HF_HOME
        with open(log, "w") as out:
            proc = subprocess.Popen([client["python"], "launch.py", *args], cwd=client["dir"], stdout=out,
                                    stderr=subprocess.STDOUT, env=env)
        server = cls(f"http://127.0.0.1:{port}", base, log, proc)
        server.kind, server.ckpt = kind, client["ckpt"]
        server.folder = os.path.join(base, "models", "calibrated_samplers")
        server.wait_up("/sdapi/v1/samplers")
        server.wait_loaded()
        return server

    def wait_loaded(self, limit=300):
        """A1111's API answers before its checkpoint has loaded (it loads in a thread)."""
        if self.kind == "a1111":
            self.wait_for(lambda: "Model loaded in" in self.log_since(0), "the checkpoint did not load", limit)

    def post(self, path, body, timeout=3600):  # a calibration with its end-to-end stage: 13-30 min on shared cores
        status, raw = self.http("POST", path, body, timeout=timeout)
        return status, json.loads(raw)

    def txt2img(self, sampler, scheduler="Karras", steps=4, cfg=5.0, seed=1234, prompt="a tiny test", **more):
        status, body = self.post("/sdapi/v1/txt2img", {
            "prompt": prompt, "negative_prompt": "", "sampler_name": sampler, "scheduler": scheduler, "steps": steps,
            "cfg_scale": cfg, "seed": seed, "width": 64, "height": 64, "batch_size": 1, "n_iter": 1,
            "save_images": False, "send_images": True, **more})
        assert status == 200, body
        info = json.loads(body["info"])
        import base64
        return info, decode_png(base64.b64decode(body["images"][0]))


def decode_png(raw):
    import numpy as np
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.int16)
