"""The spec: nixiosk.json loaded, checked against its schema and the boards, with defaults; the plan it implies."""
