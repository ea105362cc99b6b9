"""The paper's tables and figures: table specifications, reproduction and reports."""
