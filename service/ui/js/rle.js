// COCO run-length encoding, decoding side only: the API's masks ({"size": [H, W], "counts": str}).
// Counts are run lengths over the mask in column-major order, starting with a run of zeros. The
// string form is pycocotools' rleToString (attnseg/rle.py writes it): each count, minus the count
// two places earlier from the fourth on, as 5-bit groups, low bits first, 0x20 = "more groups",
// 0x10 in the last group = negative, each group offset by 48 into printable ASCII.
// Arithmetic instead of bit operators: counts of large pictures pass 2^31.

/** Compressed string -> run lengths (numbers). */
export function stringToCounts(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let x = 0;
    let scale = 1; // 32 ** groups read so far
    let more = true;
    while (more) {
      if (p >= text.length) throw new Error("RLE string ends inside a count");
      const c = text.charCodeAt(p++) - 48;
      x += (c & 0x1f) * scale;
      scale *= 32;
      more = (c & 0x20) !== 0;
      if (!more && (c & 0x10)) x -= scale; // sign-extend the last group
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

function countsOf(rle) {
  return typeof rle.counts === "string" ? stringToCounts(rle.counts) : rle.counts;
}

/**
 * Calls visit(rowMajorIndex) for every set pixel of the mask.
 * rle: {size: [H, W], counts: string | number[]}. Throws when the runs do not cover H*W pixels.
 */
function forEachPixel(rle, visit) {
  const [height, width] = rle.size;
  const counts = countsOf(rle);
  let position = 0; // column-major index
  for (let i = 0; i < counts.length; i++) {
    const end = position + counts[i];
    if (i % 2 === 1) {
      for (let j = position; j < end; j++) {
        const y = j % height;
        visit(y * width + (j - y) / height);
      }
    }
    position = end;
  }
  if (position !== height * width) {
    throw new Error(`RLE covers ${position} pixels, its size says ${height * width}`);
  }
}

/**
 * Segments -> Int16Array(H*W), row-major: the index of the segment covering each pixel, -1 where none
 * (a later segment wins where two overlap; the API's segments partition the picture).
 */
export function labelMap(segments, height, width) {
  const labels = new Int16Array(height * width).fill(-1);
  segments.forEach((segment, index) => {
    const [h, w] = segment.segmentation.size;
    if (h !== height || w !== width) {
      throw new Error(`segment ${segment.id} is ${w}x${h}, the picture ${width}x${height}`);
    }
    forEachPixel(segment.segmentation, (pixel) => { labels[pixel] = index; });
  });
  return labels;
}
