"""A test environment loaded through ``env.module``: two tool turns whose observations are as
long as the action (so environment tokens sit at different offsets within a group), then the
third action is the answer, scored by the run's reward."""

from megatron_rl.envs import ENVIRONMENTS, Environment, StepResult


@ENVIRONMENTS.register("e2e_echo")
class EchoTurns(Environment):
    def __init__(self, *, score=None, tool_turns: int = 2):
        super().__init__(score=score)
        self.tool_turns, self.turn = tool_turns, 0

    def step(self, action):
        self.turn += 1
        if self.turn > self.tool_turns:
            return StepResult(reward=self.score(action), done=True)
        n = 1 + len(action.split()) % 3
        return StepResult(observation="result " + " ".join(["1"] * n) + " =", tool_call=True)
