"""The serving API: profiles, recommendations, send times and rendered emails over HTTP.

Import the parts from their modules (``pipeline.api.app``, ``.server``, ``.auth``); this
package stays light so that :mod:`pipeline.settings` can import its configuration.
"""
