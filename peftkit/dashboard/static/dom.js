// Building the page: every element is made with h(), and every string becomes a text node, never
// markup. No script of this page parses a string as HTML, so a run, adapter, tag or prompt holding
// "<script>" shows as those characters and never runs (the server's Content-Security-Policy backs this up).

const SVG = 'http://www.w3.org/2000/svg';

// h('div', {class: 'x', onclick: fn, title: 't'}, 'text', child, [more]) -> an element.
export function h(tag, attrs, ...children) {
  const el = tag.startsWith('svg:') ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith('on')) { if (typeof value === 'function') el.addEventListener(name.slice(2), value); }
    else if (name === 'class') el.setAttribute('class', Array.isArray(value) ? value.filter(Boolean).join(' ') : value);
    else el.setAttribute(name, value === true ? '' : String(value));
  }
  add(el, children);
  return el;
}

function add(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) add(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function svg(tag, attrs, ...children) {
  return h('svg:' + tag, attrs, ...children);
}

// Replace an element's children.
export function fill(el, ...children) {
  el.replaceChildren();
  add(el, children);
  return el;
}

export function num(value, digits = 4) {
  if (value === null || value === undefined || value === '') return '—';
  if (typeof value !== 'number') return String(value);
  if (Number.isInteger(value)) return value.toLocaleString('en-US');
  return Math.abs(value) >= 1000 ? value.toLocaleString('en-US', {maximumFractionDigits: 1})
    : Number(value.toPrecision(digits)).toString();
}

export function bytes(n) {
  if (n === null || n === undefined) return '—';
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : String(n)) + ' ' + units[i];
}

export function ago(seconds) {
  if (seconds === null || seconds === undefined) return '—';
  if (seconds < 60) return Math.round(seconds) + ' s ago';
  if (seconds < 3600) return Math.round(seconds / 60) + ' min ago';
  if (seconds < 86400) return (seconds / 3600).toFixed(1) + ' h ago';
  return Math.round(seconds / 86400) + ' d ago';
}

// 'sha256:4a5ce3dc…' with the whole value as the tooltip.
export function fingerprint(value) {
  if (!value) return h('span', {class: 'muted'}, 'unknown');
  const hex = String(value).replace(/^sha256:/, '');
  return h('code', {class: 'fp', title: value}, hex.slice(0, 12) + '…');
}

// A two-column table of an object's fields; nested objects become nested tables, lists of rows a table.
export function kvTable(obj, {skip = [], cls = 'kv'} = {}) {
  const rows = Object.entries(obj || {}).filter(([k]) => !skip.includes(k)).map(([k, v]) =>
    h('tr', null, h('th', null, k), h('td', null, value(v))));
  return rows.length ? h('table', {class: cls}, h('tbody', null, rows)) : h('p', {class: 'muted'}, 'nothing recorded');
}

function value(v) {
  if (v === null || v === undefined) return h('span', {class: 'muted'}, '—');
  if (Array.isArray(v)) {
    if (!v.length) return h('span', {class: 'muted'}, 'none');
    if (v.every(x => x && typeof x === 'object' && !Array.isArray(x))) return rowsTable(v);
    return v.map(x => typeof x === 'object' ? JSON.stringify(x) : String(x)).join(', ');
  }
  if (typeof v === 'object') return kvTable(v, {cls: 'kv nested'});
  if (typeof v === 'boolean') return v ? 'yes' : 'no';
  return num(v);
}

export function rowsTable(rows) {
  const columns = [...new Set(rows.flatMap(r => Object.keys(r)))];
  return h('table', {class: 'grid'},
    h('thead', null, h('tr', null, columns.map(c => h('th', null, c)))),
    h('tbody', null, rows.map(r => h('tr', null, columns.map(c => h('td', null, value(r[c])))))));
}

export function badge(text, kind) {
  return h('span', {class: ['badge', kind]}, text);
}
