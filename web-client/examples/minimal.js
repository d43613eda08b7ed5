// @ts-check
// The smallest useful integration: connect, show the answer as it streams, ask, stop.
// From another origin, import it from the relay instead: 'https://relay.example.com/avatar-edge.js'.
import { connect } from '../avatar-edge.js';

const video = /** @type {HTMLVideoElement} */ (document.getElementById('tutor'));
const answer = /** @type {HTMLElement} */ (document.getElementById('answer'));
const form = /** @type {HTMLFormElement} */ (document.getElementById('ask'));
const question = /** @type {HTMLInputElement} */ (document.getElementById('question'));
const stop = /** @type {HTMLButtonElement} */ (document.getElementById('stop'));

const session = await connect({ avatarId: 'tutor', video });
session.on('assistant_text', (a) => { answer.textContent = a.full; });
session.on('error', (e) => { answer.textContent = `(${e.code}) ${e.message}`; });
form.addEventListener('submit', (e) => {
  e.preventDefault();
  video.muted = false; // a click: the tutor's voice may play
  if (session.say(question.value)) question.value = '';
});
stop.addEventListener('click', () => session.interrupt());

// For the test that drives this page.
/** @type {any} */ (window).example = { session };
