// The storefront demo page: renders the catalog and tracks what the shopper does.
import { loadTracker } from './tracker.js'

const SCROLL_MARKS = [25, 50, 75, 100]

function readConfig() {
  const node = document.getElementById('storefront-config')
  return JSON.parse(node ? node.textContent : '{}')
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag)
  for (const [key, value] of Object.entries(attrs)) {
    if (key === 'class') node.className = value
    else if (key.startsWith('data-')) node.setAttribute(key, value)
    else node[key] = value
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)))
  }
  return node
}

function productProperties(product, position) {
  return {
    product_id: product.product_id,
    name: product.name,
    category: product.category,
    brand: product.brand,
    price: product.price,
    currency: product.currency,
    position,
  }
}

function swatch(colour) {
  let hash = 0
  for (const ch of colour) hash = (hash * 31 + ch.charCodeAt(0)) % 360
  return `hsl(${hash}, 35%, 72%)`
}

// A muted looping "product video" drawn on a canvas: a real <video> element, no media file.
function placeholderVideo(product) {
  const canvas = el('canvas', { width: 160, height: 90 })
  const ctx = canvas.getContext('2d')
  let frame = 0
  const draw = () => {
    frame += 1
    ctx.fillStyle = swatch(product.colour)
    ctx.fillRect(0, 0, 160, 90)
    ctx.fillStyle = '#222'
    ctx.fillRect((frame * 3) % 160, 40, 20, 10)
  }
  draw()
  const timer = setInterval(draw, 100)
  const video = el('video', { muted: true, loop: true, playsInline: true, className: 'video' })
  video.setAttribute('data-video-id', `v_${product.product_id}`)
  video.srcObject = canvas.captureStream ? canvas.captureStream(10) : null
  video.stop = () => clearInterval(timer)
  return video
}

function trackScrollDepth(analytics) {
  const reached = new Set()
  const check = () => {
    const doc = document.documentElement
    const seen = window.scrollY + window.innerHeight
    const depth = doc.scrollHeight > 0 ? Math.min(100, (seen / doc.scrollHeight) * 100) : 100
    for (const mark of SCROLL_MARKS) {
      if (depth >= mark - 0.5 && !reached.has(mark)) {
        reached.add(mark)
        analytics.track('Scroll Depth', { depth: mark, path: window.location.pathname })
      }
    }
  }
  window.addEventListener('scroll', check, { passive: true })
  return { check, reset: () => reached.clear() }
}

function start() {
  const config = readConfig()
  const analytics = loadTracker({ writeKey: config.writeKey })
  const cart = []
  const grid = document.getElementById('products')
  const detail = document.getElementById('detail')
  const cartCount = document.getElementById('cart-count')
  const scroll = trackScrollDepth(analytics)
  window.storefront = { analytics, cart }

  const addToCart = (product, position) => {
    cart.push(product.product_id)
    cartCount.textContent = String(cart.length)
    analytics.track('Product Added', { ...productProperties(product, position), quantity: 1 })
  }

  const openDetail = (product, position) => {
    const old = detail.querySelector('video')
    if (old) old.stop()
    const video = placeholderVideo(product)
    let played = false
    video.addEventListener('play', () => {
      if (played) return
      played = true
      analytics.track('Video Played', {
        video_id: video.getAttribute('data-video-id'),
        product_id: product.product_id,
      })
    })
    detail.replaceChildren(
      el('h2', {}, product.name),
      el('p', { class: 'meta' }, `${product.brand} · ${product.category} · ${product.colour}`),
      video,
      el('p', { class: 'price' }, `${product.price.toFixed(2)} ${product.currency}`),
      el('button', { class: 'play', type: 'button', onclick: () => video.play() }, 'Play video'),
      el(
        'button',
        { class: 'add', type: 'button', onclick: () => addToCart(product, position) },
        'Add to cart',
      ),
    )
    detail.hidden = false
    detail.setAttribute('data-product-id', product.product_id)
    analytics.track('Product Viewed', productProperties(product, position))
  }

  const render = (products) => {
    grid.replaceChildren(
      ...products.map((product, index) => {
        const position = index + 1
        const card = el(
          'article',
          { class: 'card', 'data-product-id': product.product_id },
          el('div', { class: 'swatch' }),
          el('h3', {}, product.name),
          el('p', { class: 'meta' }, product.brand),
          el('p', { class: 'price' }, `${product.price.toFixed(2)} ${product.currency}`),
        )
        card.querySelector('.swatch').style.background = swatch(product.colour)
        card.addEventListener('click', () => {
          analytics.track('Product Clicked', productProperties(product, position))
          openDetail(product, position)
        })
        const add = el('button', { class: 'add', type: 'button' }, 'Add to cart')
        add.disabled = product.stock <= 0
        add.addEventListener('click', (event) => {
          event.stopPropagation()
          addToCart(product, position)
        })
        card.append(add)
        return card
      }),
    )
  }

  const load = (category) =>
    fetch(`/storefront/catalog.json?limit=48${category ? `&category=${encodeURIComponent(category)}` : ''}`)
      .then((res) => res.json())
      .then((body) => {
        render(body.products)
        return body
      })

  load('').then((body) => {
    const filters = document.getElementById('filters')
    filters.replaceChildren(
      ...['', ...body.categories].map((category) =>
        el(
          'button',
          {
            type: 'button',
            'data-category': category,
            onclick: () => {
              analytics.page('Storefront', category || 'All', { category: category || 'all' })
              scroll.reset()
              load(category)
            },
          },
          category || 'All',
        ),
      ),
    )
    document.body.setAttribute('data-ready', 'true')
    scroll.check()
  })

  document.getElementById('login').addEventListener('submit', (event) => {
    event.preventDefault()
    const form = new FormData(event.target)
    const userId = String(form.get('customer_id') || '').trim()
    const email = String(form.get('email') || '').trim()
    if (!userId) return
    analytics.identify(userId, email ? { email } : {})
    analytics.track('Logged In', { method: 'password' })
    document.getElementById('who').textContent = `Signed in as ${userId}`
  })

  analytics.page('Storefront', 'All')
}

start()
