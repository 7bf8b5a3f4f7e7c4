"""The capacity planner: `tandem profile` measures an engine into a JSON profile;
`tandem plan` simulates serving from it with the engine's own scheduler and the router's own
placement policies, and recommends a configuration (docs/operations.md, "Capacity planning")."""
