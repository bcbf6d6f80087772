// A js-libp2p client for tests/test_interop_js.py: TCP + Noise + yamux to a meshnode
// provider on 127.0.0.1, then identify, ping, a kad-dht provider lookup and two frames on
// /meshnode/job/1 (junk, and a valid Open for a model the provider does not serve).
//
//   node client.mjs PROVIDER_MULTIADDR PROVIDER_KEY_HEX [OTHER_MULTIADDR...]
//
// PROVIDER_KEY_HEX is the DHT key of the model's provider record (a sha2-256 multihash,
// meshnode.p2p.dht.provider_key). Prints one JSON line per step ({"step", "ok", ...})
// and always exits 0 once the steps ran, so the test can say which step failed; every
// step has its own timeout.
import './polyfill.mjs' // first: libp2p needs it while loading
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { kadDHT, removePublicAddressesMapper } from '@libp2p/kad-dht'
import { ping } from '@libp2p/ping'
import { tcp } from '@libp2p/tcp'
import { decode, encode } from '@msgpack/msgpack'
import { multiaddr } from '@multiformats/multiaddr'
import { createLibp2p } from 'libp2p'
import { CID } from 'multiformats/cid'
import * as Digest from 'multiformats/hashes/digest'

const STEP_TIMEOUT_MS = 15000 // one step on a loaded 2-core box; each is ~10 ms idle
const JOB_PROTOCOL = '/meshnode/job/1'
const RAW_CODEC = 0x55
const MAX_READ_BYTES = 65536 // an Error frame is < 2 KiB; never buffer more

const [providerAddr, providerKeyHex, ...others] = process.argv.slice(2)
if (!providerAddr || !providerKeyHex) {
  console.error('usage: node client.mjs PROVIDER_MULTIADDR PROVIDER_KEY_HEX [MULTIADDR...]')
  process.exit(2)
}

function report (step, ok, fields = {}) {
  console.log(JSON.stringify({ step, ok, ...fields }))
}

async function run (step, fn) {
  const signal = AbortSignal.timeout(STEP_TIMEOUT_MS)
  try {
    const fields = await fn(signal)
    report(step, true, fields)
  } catch (err) {
    report(step, false, { error: String(err?.stack ?? err).slice(0, 1000) })
  }
}

function uvarint (n) {
  const out = []
  while (n >= 0x80) { out.push((n & 0x7f) | 0x80); n >>>= 7 }
  out.push(n)
  return Uint8Array.from(out)
}

function frame (body) {
  const prefix = uvarint(body.length)
  const out = new Uint8Array(prefix.length + body.length)
  out.set(prefix, 0)
  out.set(body, prefix.length)
  return out
}

// Reads one length-prefixed msgpack frame (the provider's answer) from a v3 stream.
async function readFrame (stream, signal) {
  let buf = new Uint8Array(0)
  const onAbort = () => stream.abort(new Error('timed out reading a frame'))
  signal.addEventListener('abort', onAbort, { once: true })
  try {
    for await (const chunk of stream) {
      const bytes = chunk.subarray()
      const joined = new Uint8Array(buf.length + bytes.length)
      joined.set(buf, 0)
      joined.set(bytes, buf.length)
      buf = joined
      if (buf.length > MAX_READ_BYTES) throw new Error('answer too large')
      let len = 0; let shift = 0; let i = 0
      for (; i < Math.min(buf.length, 4); i++) {
        len |= (buf[i] & 0x7f) << shift
        shift += 7
        if (!(buf[i] & 0x80)) break
      }
      if (i < buf.length && buf.length >= i + 1 + len) return decode(buf.subarray(i + 1, i + 1 + len))
    }
  } finally {
    signal.removeEventListener('abort', onAbort)
  }
  throw new Error(`stream ended after ${buf.length} bytes without a whole frame`)
}

async function jobExchange (node, ma, payload, signal) {
  const stream = await node.dialProtocol(ma, JOB_PROTOCOL, { signal })
  stream.send(payload)
  const answer = await readFrame(stream, signal)
  await stream.close({ signal }).catch(() => {})
  return { answer: { t: answer.t, code: answer.code, msg: String(answer.msg ?? '').slice(0, 200) } }
}

const node = await createLibp2p({
  addresses: { listen: [] },
  transports: [tcp()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  services: {
    identify: identify(),
    ping: ping(),
    dht: kadDHT({
      protocol: '/ipfs/kad/1.0.0',
      clientMode: true,
      peerInfoMapper: removePublicAddressesMapper // loopback addresses are all we have
    })
  }
})

const ma = multiaddr(providerAddr)
let conn
await run('connect', async (signal) => {
  conn = await node.dial(ma, { signal })
  return { remote: conn.remotePeer.toString(), encryption: conn.encryption, multiplexer: conn.multiplexer }
})
for (const other of others) {
  await run('connect-other', async (signal) => {
    const c = await node.dial(multiaddr(other), { signal })
    return { remote: c.remotePeer.toString() }
  })
}

await run('identify', async (signal) => {
  const result = await node.services.identify.identify(conn, { signal })
  return {
    peer: result.peerId.toString(),
    agent: result.agentVersion,
    protocols: result.protocols,
    listen: result.listenAddrs.map(String)
  }
})

await run('ping', async (signal) => {
  const ms = await node.services.ping.ping(ma, { signal })
  return { rtt_ms: ms }
})

await run('dht-find-providers', async (signal) => {
  const cid = CID.createV1(RAW_CODEC, Digest.decode(Buffer.from(providerKeyHex, 'hex')))
  const found = new Set()
  for await (const ev of node.services.dht.findProviders(cid, { signal })) {
    if (ev.name === 'PROVIDER') for (const p of ev.providers) found.add(p.id.toString())
    if (found.has(conn.remotePeer.toString())) break
  }
  return { providers: [...found] }
})

await run('job-junk', (signal) =>
  jobExchange(node, ma, frame(Uint8Array.from([0xc1, 0xc1, 0xc1])), signal))

await run('job-open-unknown-model', (signal) => {
  const open = {
    t: 'open',
    v: 1,
    job_id: new Uint8Array(16).fill(1),
    model_id: '0'.repeat(64),
    params: {},
    max_tokens: 4,
    channel_id: null,
    epk: new Uint8Array(32).fill(2),
    hdr: new Uint8Array(24).fill(3)
  }
  return jobExchange(node, ma, frame(encode(open)), signal)
})

await node.stop()
process.exit(0)
