// @ts-check
/**
 * compat.js: one script tag that lets a page written for the old server (the test page in the
 * original design notes) play from avatar-edge without editing its code, and show its first
 * frame sooner:
 *
 * ```html
 * <script src="https://relay.example.com/compat.js"></script>
 * ```
 *
 * Put it in the page's `<head>`, before the page's own script. It does two things.
 *
 * 1. **The offer gets its media sections.** The old page calls `createOffer()` on a peer with no
 *    transceiver, so Chromium offers no media at all and no server can answer with video (the
 *    relay answers such an offer with the `offer_without_media` error). Before an offer from a peer
 *    with no transceiver, this adds a receive-only video and a receive-only audio transceiver: the
 *    two lines docs/integration.md tells integrators to add. A page that adds its own is left as
 *    it is.
 *
 * 2. **The browser's audio output is started while the page loads.** The first time a page plays
 *    a stream with sound, Chromium starts its audio output (on a browser that has played nothing
 *    yet, a separate audio process). That takes about 50 ms, during which the page's main thread
 *    waits, and it happens just as the first frame arrives: connect → first frame measured 150 ms
 *    instead of 50. An `AudioContext` created here pays that cost at load, while the page waits
 *    for its user to click. Without a click the context stays suspended and plays nothing;
 *    Chromium's console notes that it "was not allowed to start", which is expected.
 */
(function avatarEdgeCompat() {
  const Peer = globalThis.RTCPeerConnection;
  if (Peer && !(/** @type {any} */ (Peer.prototype).avatarEdgeCompat)) {
    const createOffer = Peer.prototype.createOffer;
    /** @this {RTCPeerConnection} */
    function createOfferWithMedia(/** @type {any[]} */ ...args) {
      if (this.getTransceivers().length === 0) {
        this.addTransceiver('video', { direction: 'recvonly' });
        this.addTransceiver('audio', { direction: 'recvonly' });
      }
      return /** @type {any} */ (createOffer).apply(this, args);
    }
    Peer.prototype.createOffer = /** @type {any} */ (createOfferWithMedia);
    /** @type {any} */ (Peer.prototype).avatarEdgeCompat = true;
  }
  warmAudioOutput();

  /** Create (once per page) the suspended `AudioContext` that starts the audio output early. */
  function warmAudioOutput() {
    const g = /** @type {any} */ (globalThis);
    const Context = g.AudioContext || g.webkitAudioContext;
    if (!Context || g.avatarEdgeAudioWarmed) return;
    try {
      g.avatarEdgeAudioWarmed = new Context();
    } catch {
      // No audio output (a server without sound devices): nothing to start early.
    }
  }
})();
