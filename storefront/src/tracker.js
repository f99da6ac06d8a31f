// analytics-next pointed at the pipeline collector, with no request to Segment's CDN or API.
import { AnalyticsBrowser } from '@segment/analytics-next'
import { sessionPlugin } from './session.js'

export const BATCH_SIZE = 50
export const BATCH_TIMEOUT_MS = 500

// Settings that would normally come from cdn.segment.com/v1/projects/<key>/settings: passing
// them as cdnSettings skips that fetch; metrics sampleRate 0 stops the /m telemetry calls.
export function collectorSettings(writeKey, collectorHost, protocol) {
  return {
    integrations: {
      'Segment.io': {
        apiKey: writeKey,
        apiHost: `${collectorHost}/v1`,
        protocol,
        deliveryStrategy: {
          strategy: 'batching',
          config: { size: BATCH_SIZE, timeout: BATCH_TIMEOUT_MS },
        },
      },
    },
    plan: {},
    metrics: { sampleRate: 0 },
    remotePlugins: [],
    enabledMiddleware: {},
  }
}

// Load analytics-next for the collector at collectorHost ("host:port"; default: this page's).
export function loadTracker({
  writeKey,
  collectorHost = window.location.host,
  protocol = window.location.protocol.replace(':', ''),
}) {
  return AnalyticsBrowser.load(
    {
      writeKey,
      cdnSettings: collectorSettings(writeKey, collectorHost, protocol),
      plugins: [sessionPlugin()],
    },
    {},
  )
}
