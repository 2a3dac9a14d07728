const units = ["B", "KiB", "MiB", "GiB", "TiB"];
function bytes(n) {
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
// Kinds (and workers) in the order first seen, a golden angle apart on the colour wheel:
// neighbours always differ, and a kind keeps its colour. Reds are left out: they mean
// errors and transfers.
function prefixColor(index) {
  const turn = (210 + index * 137.508) % 360;
  return "hsl(" + Math.round(25 + turn * 310 / 360) + ",65%,48%)";
}
function swatch(legend, name, color) {
  const span = document.createElement("span");
  const square = document.createElement("i");
  square.className = "swatch";
  square.style.background = color;
  span.append(square, name);
  legend.append(span);
}
const TRANSFER_COLOR = "#d62728";
// One entry of the task stream on its worker's row: a task as a bar in its prefix's colour;
// results received from a peer as a thin red bar along the bottom of the receiver's row.
function drawStreamEntry(ctx, e, x, top, height, prefixes, seen) {
  const left = x(e.end_ms - e.duration_ms);
  const width = Math.max(1, x(e.end_ms) - left);
  if (e.prefix === null) {
    seen.set("transfer", TRANSFER_COLOR);
    ctx.fillStyle = TRANSFER_COLOR;
    ctx.fillRect(left, top + height - 4, width, 4);
    return;
  }
  const name = (prefixes[e.prefix] || {name: "?"}).name;
  seen.set(name, prefixColor(e.prefix));
  ctx.fillStyle = prefixColor(e.prefix);
  ctx.fillRect(left, top, width, height);
}
