"""Rendered personalized emails: subject, preheader, HTML and plain-text parts, and a snapshot.

Templates live in ``templates/`` (Jinja2, autoescaped HTML); rendering is pure apart from
reading them once.
"""

from pipeline.emails.render import EmailParams, RenderedEmail, render_email

__all__ = ["EmailParams", "RenderedEmail", "render_email"]
