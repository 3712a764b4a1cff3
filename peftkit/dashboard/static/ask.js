// A modal question in a <dialog>: confirm an action, or ask for one value. Resolves to true / the value
// typed when confirmed, and to null when cancelled (Escape, the Cancel button, or a click outside).

import {h} from './dom.js';

export function ask({title, body = '', input = null, confirm = 'OK', danger = false}) {
  return new Promise(resolve => {
    const field = input ? h('input', {type: 'text', name: input, placeholder: input, required: true,
      pattern: '[A-Za-z0-9][A-Za-z0-9._\\-]{0,127}', title: 'letters, digits, ".", "_" or "-"'}) : null;
    const form = h('form', {method: 'dialog'},
      h('h3', null, title), body ? h('p', null, body) : null, field,
      h('div', {class: 'actions'},
        h('button', {type: 'button', value: 'cancel', class: 'cancel', onclick: () => dialog.close('cancel')}, 'Cancel'),
        h('button', {type: 'submit', value: 'ok', class: ['confirm', danger && 'danger']}, confirm)));
    const dialog = h('dialog', {class: 'ask'}, form);
    form.addEventListener('submit', event => {
      event.preventDefault();
      dialog.close('ok');
    });
    dialog.addEventListener('click', event => { if (event.target === dialog) dialog.close('cancel'); });
    dialog.addEventListener('close', () => {
      dialog.remove();
      if (dialog.returnValue !== 'ok') return resolve(null);
      resolve(field ? field.value.trim() || null : true);
    });
    document.body.append(dialog);
    dialog.showModal();
    (field || form.querySelector('.cancel')).focus();
  });
}
