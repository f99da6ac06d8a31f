// Session id and device type for every event: the processor needs context.sessionId on
// browser track/page events and context.device.type on all of them.

export const SESSION_KEY = 'storefront.session'
export const SESSION_IDLE_MS = 30 * 60 * 1000

function randomId() {
  if (typeof crypto !== 'undefined' && typeof crypto.randomUUID === 'function') {
    return crypto.randomUUID()
  }
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 12)}`
}

// The current session id, rotated after SESSION_IDLE_MS without an event; sessionStorage keeps
// it per tab, like an analytics session. Falls back to memory when storage is blocked.
export function sessionTracker(storage = window.sessionStorage, now = () => Date.now()) {
  let memory = null
  const read = () => {
    try {
      const raw = storage.getItem(SESSION_KEY)
      return raw ? JSON.parse(raw) : memory
    } catch {
      return memory
    }
  }
  const write = (session) => {
    memory = session
    try {
      storage.setItem(SESSION_KEY, JSON.stringify(session))
    } catch {
      // storage full or disabled: the in-memory copy still serves this page
    }
  }
  return {
    touch() {
      const at = now()
      const current = read()
      const fresh =
        current && typeof current.id === 'string' && at - current.lastSeen <= SESSION_IDLE_MS
      const session = { id: fresh ? current.id : `s_${randomId()}`, lastSeen: at }
      write(session)
      return session.id
    },
  }
}

// mobile, tablet or desktop: the user agent first, the viewport when it says nothing.
export function deviceType(userAgent = navigator.userAgent, width = window.innerWidth) {
  const ua = userAgent || ''
  if (/iPad|Tablet|PlayBook|Silk|Kindle/i.test(ua) || (/Android/i.test(ua) && !/Mobile/i.test(ua))) {
    return 'tablet'
  }
  if (/Mobi|iPhone|iPod|Android|BlackBerry|IEMobile|Opera Mini/i.test(ua)) {
    return 'mobile'
  }
  if (width > 0 && width < 768) {
    return 'mobile'
  }
  return 'desktop'
}

// An analytics-next enrichment plugin that stamps context.sessionId and context.device.type.
export function sessionPlugin(tracker = sessionTracker()) {
  const enrich = (ctx) => {
    const event = ctx.event
    const context = (event.context = event.context || {})
    context.sessionId = tracker.touch()
    context.device = { ...(context.device || {}), type: deviceType() }
    return ctx
  }
  return {
    name: 'Storefront Session',
    type: 'enrichment',
    version: '1.0.0',
    isLoaded: () => true,
    load: () => Promise.resolve(),
    track: enrich,
    page: enrich,
    identify: enrich,
    alias: enrich,
    group: enrich,
    screen: enrich,
  }
}
