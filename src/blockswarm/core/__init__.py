"""Pure data shared by every layer: specs, placement, routes, scenarios, errors."""
