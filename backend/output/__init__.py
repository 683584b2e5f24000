"""The output path: engine deltas → reasoning, content and tool calls → Replies."""
