// ComfyUI frontend extension of the Calibrated Samplers pack: the calibration file list is a combo whose
// names (method, steps, schedule, cfg) are long; a new "Sampler from calibration file" node starts wide
// enough to show them instead of cutting them off.
import { app } from "../../scripts/app.js";

const WIDE = { CalibratedSamplersSamplerFromFile: 460, CalibratedSamplersCalibrate: 400 };

app.registerExtension({
  name: "calibrated_samplers.wide_nodes",
  nodeCreated(node) {
    const width = WIDE[node.comfyClass];
    if (width && node.size[0] < width) {
      node.setSize([width, node.size[1]]);
    }
  },
});
