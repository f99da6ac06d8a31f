"""Real-time personalization pipeline for email: customer events in, personalized emails out."""

__version__ = "0.1.0"
