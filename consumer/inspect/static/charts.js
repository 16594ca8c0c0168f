// Line charts on a canvas, no library: drawLines(canvas, xs, series), series = [{name, color, values}].
// Every label is drawn with fillText (text, never markup).
"use strict";

const PALETTE = ["#c0392b", "#7f8c8d", "#27ae60", "#2980b9", "#8e44ad", "#d35400", "#16a085", "#2c3e50"];

function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = Math.pow(10, Math.floor(Math.log10(value)));
  for (const step of [1, 2, 5, 10]) {
    if (step * power >= value) return step * power;
  }
  return 10 * power;
}

function drawLines(canvas, xs, series) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, left = 44, right = 8, top = 18, bottom = 18;
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px sans-serif";
  ctx.fillStyle = "#555";
  const values = series.flatMap((s) => s.values.filter((v) => v !== null && v !== undefined));
  const ymax = niceMax(Math.max(0, ...values));
  const x0 = xs.length ? xs[0] : 0, x1 = xs.length ? xs[xs.length - 1] : 1;
  const px = (x) => left + (x1 === x0 ? 0 : ((x - x0) / (x1 - x0)) * (w - left - right));
  const py = (y) => top + (1 - y / ymax) * (h - top - bottom);
  ctx.strokeStyle = "#ddd";
  ctx.beginPath();
  for (const frac of [0, 0.5, 1]) {
    ctx.moveTo(left, py(ymax * frac));
    ctx.lineTo(w - right, py(ymax * frac));
    ctx.fillText(String(Math.round(ymax * frac * 100) / 100), 2, py(ymax * frac) + 4);
  }
  ctx.stroke();
  if (xs.length) {
    ctx.fillText(new Date(x0 * 1000).toLocaleTimeString(), left, h - 4);
    const last = new Date(x1 * 1000).toLocaleTimeString();
    ctx.fillText(last, w - right - ctx.measureText(last).width, h - 4);
  }
  let legendX = left;
  series.forEach((s, index) => {
    const color = s.color || PALETTE[index % PALETTE.length];
    ctx.strokeStyle = color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let drawing = false;
    s.values.forEach((v, i) => {
      if (v === null || v === undefined) { drawing = false; return; }
      if (drawing) ctx.lineTo(px(xs[i]), py(v)); else ctx.moveTo(px(xs[i]), py(v));
      drawing = true;
    });
    ctx.stroke();
    s.values.forEach((v, i) => { // a dot per bucket: a lone bucket is seen too
      if (v === null || v === undefined) return;
      ctx.fillStyle = color;
      ctx.fillRect(px(xs[i]) - 2, py(v) - 2, 4, 4);
    });
    ctx.fillStyle = color;
    ctx.fillText(s.name, legendX, 11);
    legendX += ctx.measureText(s.name).width + 12;
  });
}

window.mmsentCharts = { drawLines };
