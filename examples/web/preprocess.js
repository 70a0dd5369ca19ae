// timm's evaluation transform in JavaScript, to the byte where it can be: torchvision's Resize on a PIL
// image is PIL's resample (two separable passes, horizontal then vertical, 22-bit fixed-point weights,
// rounded to uint8 after each pass), then CenterCrop (Python's round-half-to-even offsets), then
// ToTensor (/255) and Normalize.

const PRECISION_BITS = 32 - 8 - 2;

const FILTERS = {
  bicubic: { support: 2.0, weight: cubic },
  bilinear: { support: 1.0, weight: (x) => (x < 0 ? -x : x) < 1 ? 1 - Math.abs(x) : 0 },
};

function cubic(x) {
  const a = -0.5;
  x = Math.abs(x);
  if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
}

// PIL's precompute_coeffs + normalize_coeffs_8bpc for one axis.
function coefficients(inSize, outSize, filter) {
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1);
  const support = filter.support * filterscale;
  const result = [];
  for (let x = 0; x < outSize; x++) {
    const center = (x + 0.5) * scale;
    const ss = 1 / filterscale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    const weights = [];
    let total = 0;
    for (let i = 0; i < xmax; i++) {
      const w = filter.weight((i + xmin - center + 0.5) * ss);
      weights.push(w);
      total += w;
    }
    const fixed = weights.map((w) => {
      const k = total !== 0 ? w / total : w;
      return Math.trunc(k < 0 ? -0.5 + k * (1 << PRECISION_BITS) : 0.5 + k * (1 << PRECISION_BITS));
    });
    result.push({ start: xmin, weights: fixed });
  }
  return result;
}

function clip8(value) {
  const v = Math.floor(value / (1 << PRECISION_BITS));
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

function pass(image, outSize, filter, horizontal) {
  const { width, height, channels, data } = image;
  const coeffs = coefficients(horizontal ? width : height, outSize, filter);
  const outWidth = horizontal ? outSize : width;
  const outHeight = horizontal ? height : outSize;
  const out = new Uint8ClampedArray(outWidth * outHeight * 3);
  for (let y = 0; y < outHeight; y++) {
    for (let x = 0; x < outWidth; x++) {
      const { start, weights } = coeffs[horizontal ? x : y];
      for (let c = 0; c < 3; c++) {
        let ss = 1 << (PRECISION_BITS - 1);
        for (let k = 0; k < weights.length; k++) {
          const index = horizontal ? (y * width + start + k) * channels : ((start + k) * width + x) * channels;
          ss += data[index + c] * weights[k];
        }
        out[(y * outWidth + x) * 3 + c] = clip8(ss);
      }
    }
  }
  return { width: outWidth, height: outHeight, channels: 3, data: out };
}

// Resize so the shorter side is `size` (torchvision's rule for an int size), as PIL does it.
export function resize(image, spec) {
  const filter = FILTERS[spec.interpolation];
  if (!filter) throw new Error(`preprocess.json: interpolation ${spec.interpolation} is not supported here`);
  let width, height;
  if (Array.isArray(spec.size)) {
    [height, width] = spec.size;
  } else if (image.width <= image.height) {
    width = spec.size;
    height = Math.trunc((spec.size * image.height) / image.width);
  } else {
    height = spec.size;
    width = Math.trunc((spec.size * image.width) / image.height);
  }
  let result = image;
  if (width !== image.width) result = pass(result, width, filter, true);
  if (height !== image.height) result = pass(result, height, filter, false);
  return result === image ? centerCrop(image, [height, width]) : result; // same size: RGB only, as PIL
}

function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

export function centerCrop(image, [cropHeight, cropWidth]) {
  const top = roundHalfEven((image.height - cropHeight) / 2);
  const left = roundHalfEven((image.width - cropWidth) / 2);
  const out = new Uint8ClampedArray(cropWidth * cropHeight * 3);
  for (let y = 0; y < cropHeight; y++) {
    for (let x = 0; x < cropWidth; x++) {
      for (let c = 0; c < 3; c++) {
        out[(y * cropWidth + x) * 3 + c] = image.data[((y + top) * image.width + x + left) * image.channels + c];
      }
    }
  }
  return { width: cropWidth, height: cropHeight, channels: 3, data: out };
}

// ToTensor and Normalize: NCHW float32.
export function toTensor(image, spec) {
  const plane = image.width * image.height;
  const out = new Float32Array(3 * plane);
  for (let i = 0; i < plane; i++) {
    for (let c = 0; c < 3; c++) {
      out[c * plane + i] = (image.data[i * 3 + c] / 255 - spec.mean[c]) / spec.std[c];
    }
  }
  return out;
}
