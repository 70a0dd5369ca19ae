// onnxvit's hand-off in a browser: the model's own preprocessing (preprocess.json) done as timm does it
// (PIL's antialiased bicubic resize of the shorter side, center crop, scale, normalize, NCHW float32),
// then onnxruntime-web (WebAssembly) and the top-5 with their names from labels.txt.
import { resize, centerCrop, toTensor } from "./preprocess.js";

const params = new URLSearchParams(location.search);
const folder = new URL(params.get("folder") || "./", location.href);
const modelName = params.get("model") || "model.int8.ort";
const $ = (id) => document.getElementById(id);

ort.env.wasm.numThreads = 1;
ort.env.wasm.wasmPaths = new URL("node_modules/onnxruntime-web/dist/", location.href).href;

const [preprocess, labels, session] = await Promise.all([
  fetch(new URL("preprocess.json", folder)).then((r) => r.json()),
  fetch(new URL("labels.txt", folder)).then((r) => r.text()).then((t) => t.split("\n").filter((l) => l)),
  ort.InferenceSession.create(new URL(modelName, folder).href),
]);
$("model").textContent = `${modelName} (${labels.length} classes)`;
$("file").disabled = false;

async function classify(blob) {
  const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const context = canvas.getContext("2d", { colorSpace: "srgb" });
  context.drawImage(bitmap, 0, 0);
  const rgba = context.getImageData(0, 0, bitmap.width, bitmap.height).data;
  const resized = resize({ data: rgba, width: bitmap.width, height: bitmap.height, channels: 4 }, preprocess.resize);
  const crop = centerCrop(resized, preprocess.crop.size);
  showCrop(crop);
  const input = toTensor(crop, preprocess);
  const started = performance.now();
  const out = await session.run({ [session.inputNames[0]]: new ort.Tensor("float32", input, preprocess.input.shape) });
  const ms = performance.now() - started;
  const logits = Array.from(out[session.outputNames[0]].data);
  const top = logits.map((v, i) => [v, i]).sort((a, b) => b[0] - a[0]).slice(0, 5);
  const max = top[0][0];
  const sum = logits.reduce((s, v) => s + Math.exp(v - max), 0);
  $("top5").innerHTML = top
    .map(([v, i]) => `<tr><td>${labels[i] ?? i}</td><td>${((100 * Math.exp(v - max)) / sum).toFixed(1)}%</td></tr>`)
    .join("");
  $("status").textContent = `${ms.toFixed(1)} ms (onnxruntime-web, WebAssembly, 1 thread)`;
  // for automated checks: the whole answer on the page
  document.body.dataset.top1 = String(top[0][1]);
  document.body.dataset.logits = JSON.stringify(logits);
  document.body.dataset.ms = ms.toFixed(2);
}

function showCrop(crop) {
  const image = new ImageData(crop.width, crop.height);
  for (let i = 0, j = 0; i < crop.width * crop.height; i++) {
    image.data.set([crop.data[j], crop.data[j + 1], crop.data[j + 2], 255], 4 * i);
    j += crop.channels;
  }
  const canvas = $("crop");
  canvas.width = crop.width;
  canvas.height = crop.height;
  canvas.getContext("2d").putImageData(image, 0, 0);
}

$("file").addEventListener("change", (event) => classify(event.target.files[0]));
if (params.get("image")) {
  fetch(new URL(params.get("image"), location.href)).then((r) => r.blob()).then(classify)
    .catch((error) => { document.body.dataset.error = String(error); });
}
document.body.dataset.ready = "true";
