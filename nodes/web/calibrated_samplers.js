// ComfyUI frontend extension of the Calibrated Samplers pack.
// - The calibration file list is a combo whose names (method, steps, schedule, cfg) are long; a new "Sampler from
//   calibration file" node starts wide enough to show them instead of cutting them off.
// - A pack sampler that runs UNCALIBRATED (no file fits the run's model, steps, denoise and cfg), or with a file
//   made for another cfg, says so in a toast: the run itself looks like a normal success.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const WIDE = { CalibratedSamplersSamplerFromFile: 460, CalibratedSamplersCalibrate: 400 };
const EVENT = "calibrated_samplers.warning";

function showWarning(detail) {
  const toast = app.extensionManager && app.extensionManager.toast;
  if (toast && toast.add) {
    toast.add({ severity: "warn", summary: "Calibrated Samplers", detail: detail.message, life: 15000 });
  } else {
    console.warn("[Calibrated Samplers]", detail.message);  // an older frontend without toasts
  }
}

app.registerExtension({
  name: "calibrated_samplers.wide_nodes",
  setup() {
    api.addEventListener(EVENT, (event) => showWarning(event.detail));
  },
  nodeCreated(node) {
    const width = WIDE[node.comfyClass];
    if (width && node.size[0] < width) {
      node.setSize([width, node.size[1]]);
    }
  },
});
