"""Models built around the core OmniSegNet for one project each (big_vision's proj/ layout)."""
