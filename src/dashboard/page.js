const units = ["B", "KiB", "MiB", "GiB", "TiB"];
function bytes(n) {
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
// Kinds (and workers) in the order first seen, a golden angle apart on the colour wheel:
// neighbours always differ, and a kind keeps its colour.
function prefixColor(index) {
  return "hsl(" + Math.round((210 + index * 137.508) % 360) + ",65%,48%)";
}
function swatch(legend, name, color) {
  const span = document.createElement("span");
  const square = document.createElement("i");
  square.className = "swatch";
  square.style.background = color;
  span.append(square, name);
  legend.append(span);
}
