// Node 20 (Debian's, and this CI's) lacks Promise.withResolvers (Node 22), which
// js-libp2p 3 uses; client.mjs imports this first so it exists before libp2p loads.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function withResolvers () {
    let resolve, reject
    const promise = new Promise((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}
