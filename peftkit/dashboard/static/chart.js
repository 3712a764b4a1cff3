// A line chart in SVG: several series of [step, value] points on shared axes, with a legend and a
// readout of the values at the step under the pointer.

import {h, num, svg} from './dom.js';

const H = 260, PAD = {left: 56, right: 16, top: 12, bottom: 34};

// series: [{label, points: [[step, value], ...], cls}]; returns a <figure>. `width` is in the same units as the
// 260-high drawing: give a narrow chart a smaller width so its text is not scaled down.
export function lineChart(series, {title = '', xLabel = 'step', empty = 'no points logged yet', width: W = 640} = {}) {
  const drawn = series.map(s => ({...s, points: (s.points || []).filter(p => p[1] !== null && Number.isFinite(p[1]))}))
    .filter(s => s.points.length);
  const legend = h('div', {class: 'legend'}, drawn.map(s =>
    h('span', {class: ['key', s.cls]}, h('i'), s.label + ' ' + num(s.points[s.points.length - 1][1]))));
  const figure = h('figure', {class: 'chart'}, title ? h('figcaption', null, title) : null, legend);
  if (!drawn.length) {
    figure.append(h('p', {class: 'muted empty'}, empty));
    return figure;
  }
  const all = drawn.flatMap(s => s.points);
  const [x0, x1] = range(all.map(p => p[0]), 0);
  const [y0, y1] = range(all.map(p => p[1]), 0.05);
  const sx = x => PAD.left + (x - x0) / (x1 - x0) * (W - PAD.left - PAD.right);
  const sy = y => H - PAD.bottom - (y - y0) / (y1 - y0) * (H - PAD.top - PAD.bottom);
  const plot = svg('svg', {viewBox: `0 0 ${W} ${H}`, class: 'plot', role: 'img', 'aria-label': title || 'chart'});
  for (const y of ticks(y0, y1, 5)) {
    plot.append(svg('line', {x1: PAD.left, x2: W - PAD.right, y1: sy(y), y2: sy(y), class: 'grid'}),
      svg('text', {x: PAD.left - 6, y: sy(y) + 4, class: 'tick', 'text-anchor': 'end'}, num(y, 3)));
  }
  for (const x of ticks(x0, x1, 6).filter(Number.isInteger)) {
    plot.append(svg('text', {x: sx(x), y: H - PAD.bottom + 16, class: 'tick', 'text-anchor': 'middle'}, String(x)));
  }
  plot.append(svg('text', {x: W - PAD.right, y: H - 4, class: 'axis', 'text-anchor': 'end'}, xLabel));
  for (const s of drawn) {
    const d = s.points.map((p, i) => (i ? 'L' : 'M') + sx(p[0]).toFixed(1) + ' ' + sy(p[1]).toFixed(1)).join(' ');
    plot.append(svg('path', {d, class: ['line', s.cls]}));
    if (s.points.length <= 60) {
      for (const p of s.points) plot.append(svg('circle', {cx: sx(p[0]), cy: sy(p[1]), r: 2.5, class: ['dot', s.cls]}));
    }
  }
  const cursor = svg('line', {y1: PAD.top, y2: H - PAD.bottom, class: 'cursor', visibility: 'hidden'});
  const readout = h('div', {class: 'readout muted'}, ' ');
  plot.append(cursor);
  plot.addEventListener('mousemove', event => {
    const box = plot.getBoundingClientRect();
    const x = x0 + ((event.clientX - box.left) / box.width * W - PAD.left) / (W - PAD.left - PAD.right) * (x1 - x0);
    const parts = drawn.map(s => {
      const p = s.points.reduce((best, q) => Math.abs(q[0] - x) < Math.abs(best[0] - x) ? q : best);
      return `${s.label} ${num(p[1])} (step ${p[0]})`;
    });
    cursor.setAttribute('x1', sx(Math.min(x1, Math.max(x0, x))));
    cursor.setAttribute('x2', cursor.getAttribute('x1'));
    cursor.setAttribute('visibility', 'visible');
    readout.textContent = parts.join(' · ');
  });
  plot.addEventListener('mouseleave', () => cursor.setAttribute('visibility', 'hidden'));
  figure.append(plot, readout);
  return figure;
}

function range(values, pad) {
  let lo = Math.min(...values), hi = Math.max(...values);
  if (lo === hi) { lo -= Math.abs(lo) * 0.1 || 1; hi += Math.abs(hi) * 0.1 || 1; }
  const extra = (hi - lo) * pad;
  return [lo - extra, hi + extra];
}

// About n round numbers (1, 2 or 5 times a power of ten apart) between lo and hi.
function ticks(lo, hi, n) {
  const raw = (hi - lo) / n;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map(m => m * power).find(s => s >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}
