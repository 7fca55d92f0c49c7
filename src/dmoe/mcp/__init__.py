"""MCP server: MoE and expert tools."""
