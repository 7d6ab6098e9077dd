"""Seed ensembles: N seeds of one algorithm trained in one process as one batched model.

`AgentEnsemble(agents)` stacks N agents of one class and config (`torch.func.stack_module_state`: every
parameter, buffer and optimizer state gains a leading dimension N) and trains them with one batched update:
each algorithm's losses are computed per seed by `torch.func.vmap` over (weights, batch, noise), calling the
agent's own networks through `functional_call`, and summed over the seeds, so each seed's gradient is
exactly its own. One optimizer steps the stacked parameters: Adam and AdamW are elementwise, so a stacked
Adam is N Adams. Gradient norms and clipping are per seed (the norm over one seed's parameters of that
optimizer, as `clip_grad_norm_` in a separate run), done by hand along dim 0. `sync()` writes the stacked
state back into the N agents, which then save ordinary checkpoints.

Each supported algorithm's update below mirrors its `train_step` (same losses, same random draws in the same
order, the same step order: Diffusion-QL's actor loss sees the stepped critic, IDQL's critic the stepped
value, as phases of vmapped losses and stacked steps); tests/test_ensemble.py holds them equal to N separate
runs with injected noise. Supported: BC, Diffusion BC, Diffusion-QL, IDQL, FQL (its default order,
`sequential_steps: false`), EDP and DAC; the planners (Diffuser, Decision Diffuser) and the others are refused by name.

`train_ensemble(cfg, device, seeds)` is train.py with `seeds=[...]` or `ensemble=N`: one run folder per seed,
the one it would have alone, with today's checkpoint format.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from cleandiff_rl.agents import Agent, get_algorithm
from cleandiff_rl.agents.acting import act_only_settings
from cleandiff_rl.agents.base import make_config
from cleandiff_rl.agents.dac import q_guidance
from cleandiff_rl.data import load_dataset
from cleandiff_rl.evaluation import evaluate
from cleandiff_rl.training import (_rng_state, _set_rng_state, changed_settings, dataset_env_id, log_evaluation, new_agent,
                                   wall_budget)
from cleandiff_rl.utils import (CudaGraphStep, Preemption, exclusive_run_dir, finite_floats, keep_latest,
                                load_checkpoint, resolve_device, seed_everything)
from cleandiff_rl.utils.optim import cosine_decay_lrs, use_fused_step

Losses = tuple[dict[str, Tensor], dict[str, Tensor]]  # per optimizer its loss, and the metrics


def detached(module: nn.Module, *args: Any) -> Any:
    """`module(*args)` with its (current, possibly per-seed) parameters detached: a loss term that must not
    train `module` (what `requires_grad_(False)` around a call does in a separate run)."""
    return functional_call(module, {name: p.detach() for name, p in module.named_parameters()}, args)


class _Call(nn.Module):
    """Holds the template agent so `functional_call` can run any loss function on one seed's weights."""

    def __init__(self, agent: Agent):
        super().__init__()
        self.agent = agent

    def forward(self, fn: Callable[[Agent, dict], Losses], batch: dict[str, Tensor]) -> Losses:
        return fn(self.agent, batch)


# ---- the supported algorithms' per-seed losses (each its agent's train_step, without the steps) ----------

def bc_losses(agent: Agent, batch: dict[str, Tensor]) -> Losses:
    loss = torch.nn.functional.mse_loss(agent.net(batch["obs"]), batch["act"])
    return {"actor": loss}, {"actor/bc_loss": loss.detach()}


def diffusion_bc_losses(agent: Agent, batch: dict[str, Tensor]) -> Losses:
    loss = agent.actor.loss(batch["act"], batch["obs"])
    return {"actor": loss}, {"actor/bc_loss": loss.detach()}


def fql_losses(agent: Agent, batch: dict[str, Tensor]) -> Losses:
    cfg = agent.config
    obs, act, next_obs = batch["obs"], batch["act"], batch["next_obs"]
    # 1. critic: the target's next action from the one-step actor
    with torch.no_grad():
        next_act = agent.one_step(next_obs, torch.randn_like(act))
        target = batch["rew"] + cfg.discount * (1.0 - batch["terminal"]) * agent._q(agent.critic_target, next_obs, next_act)
    q1, q2 = agent.critic(obs, act)
    critic_loss = ((q1 - target).square().mean() + (q2 - target).square().mean()) / 2
    # 2. flow BC policy
    flow_loss = agent.flow.loss(act, obs)
    # 3. one-step actor: distillation from the flow's Euler map of the same noise, and the Q term
    noise = torch.randn_like(act)
    with torch.no_grad():
        teacher, velocity, n = noise, agent.flow.model["diffusion"], cfg.sampling_steps
        for i in range(n):
            teacher = teacher - velocity(teacher, teacher.new_full((len(obs),), 1.0 - i / n), obs) / n
    raw = agent.one_step(obs, noise, clip=False)
    distill_loss = (raw - teacher.clamp(-1.0, 1.0)).square().mean()
    q1_pi, q2_pi = detached(agent.critic, obs, raw.clamp(-1.0, 1.0))  # the Q loss trains the actor only
    q = (q1_pi + q2_pi) / 2
    q_loss = -q.mean()
    if cfg.normalize_q_loss:
        q_loss = q_loss / q.abs().mean().detach()
    losses = {"flow": flow_loss, "actor": cfg.alpha * distill_loss + q_loss, "critic": critic_loss}
    return losses, {"flow/bc_loss": flow_loss.detach(), "actor/distill_loss": distill_loss.detach(),
                    "actor/q_loss": q_loss.detach(), "critic/loss": critic_loss.detach(),
                    "critic/q_mean": q1.detach().mean(), "critic/target_mean": target.mean()}


def dql_critic_losses(agent: Agent, batch: dict[str, Tensor]) -> Losses:
    cfg = agent.config
    obs, act, next_obs = batch["obs"], batch["act"], batch["next_obs"]
    # 1. critic: clipped double-Q target with the next action from the EMA actor
    with torch.no_grad():
        next_act = agent._sample(next_obs, use_ema=True)
        target = batch["rew"] + cfg.discount * (1.0 - batch["terminal"]) * agent.critic_target.q_min(next_obs, next_act)
    q1, q2 = agent.critic(obs, act)
    critic_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
    return {"critic": critic_loss}, {"critic/loss": critic_loss.detach(), "critic/q_mean": q1.detach().mean(),
                                     "critic/target_mean": target.mean()}


def dql_actor_losses(agent: Agent, batch: dict[str, Tensor]) -> Losses:
    obs, act = batch["obs"], batch["act"]
    # 2. actor: BC loss + eta * normalized Q loss through the sampling chain, on the stepped critic
    bc_loss = agent.actor.loss(act, obs)
    new_act = agent._sample(obs, use_ema=False, requires_grad=True)
    q1_pi, q2_pi = detached(agent.critic, obs, new_act)  # the Q loss trains the actor only
    flip = torch.randint(2, (), device=obs.device).float()
    q_loss = -torch.lerp(q1_pi, q2_pi, flip).mean() / torch.lerp(q2_pi, q1_pi, flip).abs().mean().detach()
    return {"actor": bc_loss + agent.config.eta * q_loss}, {"actor/bc_loss": bc_loss.detach(),
                                                             "actor/q_loss": q_loss.detach()}


def edp_losses(agent: Agent, batch: dict[str, Tensor]) -> Losses:
    """EDP's losses, all on the pre-step networks (`loss_type: iql` after its value step: `edp_value_losses`)."""
    cfg = agent.config
    obs, act, next_obs = batch["obs"], batch["act"], batch["next_obs"]
    not_done = cfg.discount * (1.0 - batch["terminal"])
    # 1. critic target (td3): the next action from the target policy
    if cfg.loss_type == "td3":
        with torch.no_grad():
            prior = next_obs.new_zeros(next_obs.shape[0], agent.act_dim)
            next_act, _ = agent.actor.sample(prior, solver=cfg.solver, steps=cfg.sampling_steps, condition_cfg=next_obs,
                                             use_ema=True)
            target = batch["rew"] + not_done * agent.critic_target.q_min(next_obs, next_act)
    # 2. action approximation from one network call on the noised dataset action
    x_t, t, eps = agent.actor.add_noise(act)
    out = agent.actor.model["diffusion"](x_t, t, obs)
    diff_loss = F.mse_loss(out, eps if cfg.predict == "eps" else act)
    if cfg.predict == "eps":
        alpha, sigma = agent.actor.schedule.alpha(t).to(act.dtype)[:, None], agent.actor.schedule.sigma(t).to(act.dtype)[:, None]
        out = (x_t - sigma * out) / alpha
    a0 = out.clamp(-1.0, 1.0)
    # 3. policy term: one critic's normalized Q (td3), or the advantage-weighted likelihood with the stepped V (iql)
    metrics: dict[str, Tensor] = {}
    if cfg.loss_type == "td3":
        q1_pi, q2_pi = detached(agent.critic, obs, a0)  # the Q term trains the actor only
        flip = torch.randint(2, (), device=obs.device).float()
        q_pi = torch.lerp(q1_pi, q2_pi, flip)
        guide_loss = -cfg.alpha * q_pi.mean() / q_pi.abs().mean().detach()
    else:
        with torch.no_grad():
            q_data = agent.critic_target.q_min(obs, act)
            v = agent.value(obs).squeeze(-1)
            weights = torch.exp((q_data - v) * cfg.awr_temperature).clamp(max=100.0)
            target = batch["rew"] + not_done * agent.value(next_obs).squeeze(-1)
        log_prob = -0.5 * (act - a0).square().sum(-1) - 0.5 * agent.act_dim * math.log(2 * math.pi)
        guide_loss = -(weights * log_prob).mean()
        metrics = {"value/v_mean": v.mean()}
    # 4. each critic's regression onto the target
    q1, q2 = agent.critic(obs, act)
    loss1, loss2 = F.mse_loss(q1, target), F.mse_loss(q2, target)
    return ({"actor": diff_loss + guide_loss, "q1": loss1, "q2": loss2},
            {"actor/bc_loss": diff_loss.detach(), "actor/q_loss": guide_loss.detach(),
             "critic/loss": (loss1 + loss2).detach(), "critic/q_mean": q1.detach().mean(),
             "critic/target_mean": target.mean(), **metrics})


def edp_value_losses(agent: Agent, batch: dict[str, Tensor]) -> Losses:
    """EDP `loss_type: iql`, step 3a: V(s)'s expectile regression onto the target critics' min Q(s, a)."""
    with torch.no_grad():
        q_data = agent.critic_target.q_min(batch["obs"], batch["act"])
    diff = q_data - agent.value(batch["obs"]).squeeze(-1)
    weight = torch.where(diff > 0, agent.config.expectile, 1.0 - agent.config.expectile)
    value_loss = (weight * diff.square()).mean()
    return {"value": value_loss}, {"value/loss": value_loss.detach()}


def dac_critic_losses(agent: Agent, batch: dict[str, Tensor]) -> Losses:
    cfg = agent.config
    obs, act, next_obs = batch["obs"], batch["act"], batch["next_obs"]
    b, n = obs.shape[0], cfg.num_q_samples
    # 1. critic: lower confidence bound over the heads of the mean Q of n EMA-actor actions at s'
    with torch.no_grad():
        next_rep = next_obs.repeat_interleave(n, 0)
        next_q = agent.critic_target(next_rep, agent._sample(next_rep, use_ema=True)).reshape(-1, b, n).mean(-1)
        next_v = next_q.mean(0) - cfg.rho * next_q.std(0, correction=0)
        target = batch["rew"] * agent.reward_scale + cfg.discount * (1.0 - batch["terminal"]) * next_v
    qs = agent.critic(obs, act)
    critic_loss = (qs - target).square().mean()
    return {"critic": critic_loss}, {"critic/loss": critic_loss.detach(), "critic/q_mean": qs.detach().mean(),
                                     "critic/q_std": qs.detach().std(0, correction=0).mean(),
                                     "critic/target_mean": target.mean()}


def dac_actor_losses(agent: Agent, batch: dict[str, Tensor]) -> Losses:
    obs, act = batch["obs"], batch["act"]
    # 3. actor: noise regression with the target shifted by the normalized Q gradient at the noisy action
    noisy, t, eps = agent.actor.add_noise(act)
    sigma = agent.actor.schedule.sigma(t).to(act.dtype)[:, None]
    q_grad = q_guidance(agent.critic_target, obs, noisy.detach(), act)
    pred = agent.actor.model["diffusion"](noisy, t, obs)
    bc_loss = (pred - eps).square().mean()
    guidance_loss = (sigma * q_grad * pred).mean()
    return {"actor": agent.eta * bc_loss + guidance_loss}, {"actor/bc_loss": bc_loss.detach(),
                                                             "actor/guidance_loss": guidance_loss.detach()}


def idql_value_losses(agent: Agent, batch: dict[str, Tensor]) -> Losses:
    obs, act = batch["obs"], batch["act"]
    # 1. value: expectile regression onto the target critic
    with torch.no_grad():
        q_target = agent.critic_target.q_min(obs, act)
    v = agent.value(obs).squeeze(-1)
    diff = q_target - v
    value_loss = (torch.abs(agent.config.expectile - (diff < 0).float()) * diff**2).mean()
    return {"value": value_loss}, {"value/loss": value_loss.detach(), "value/v_mean": v.detach().mean()}


def idql_critic_losses(agent: Agent, batch: dict[str, Tensor]) -> Losses:
    cfg, obs, act = agent.config, batch["obs"], batch["act"]
    # 2. critic: one-step TD onto the stepped V(s')
    with torch.no_grad():
        next_v = agent.value(batch["next_obs"]).squeeze(-1)
        target = batch["rew"] * agent.reward_scale + cfg.discount * (1.0 - batch["terminal"]) * next_v
    q1, q2 = agent.critic(obs, act)
    critic_loss = (F.mse_loss(q1, target) + F.mse_loss(q2, target)) / 2
    return {"critic": critic_loss}, {"critic/loss": critic_loss.detach(), "critic/q_mean": q1.detach().mean()}


class AgentEnsemble:
    """N agents of one class and config, trained as one batched model (see the module docstring).

    `step(batch)` takes a batch whose every tensor has a leading seed dimension N (seed i's batch at [i])
    and returns metrics of shape (N,); `after_step()` does the agents' bookkeeping (EMAs, counters); `sync()`
    copies the stacked weights, buffers, optimizer states and counters back into `agents`.
    randomness: vmap's; "different" (each seed draws its own noise) in training, "same" for tests.
    """

    def __init__(self, agents: list[Agent], randomness: str = "different"):
        template = agents[0]
        if template.name not in UPDATES:
            raise ValueError(f"seed ensembles support {', '.join(sorted(UPDATES))}, not {template.name}")
        if any(type(a) is not type(template) or a.config != template.config for a in agents):
            raise ValueError("an ensemble's agents must share one algorithm and config")
        if getattr(template.config, "sequential_steps", False):
            raise ValueError(f"{template.name} with sequential_steps=true steps between its losses: "
                             "not supported by seed ensembles")
        self.agents, self.template, self.n, self.randomness = agents, template, len(agents), randomness
        self.params, self.buffers = stack_module_state(agents)
        self._call = _Call(template)
        names = {id(p): name for name, p in template.named_parameters()}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        for key, opt in template.optimizers().items():
            groups = [{**{k: v.clone() if torch.is_tensor(v) else v for k, v in group.items() if k != "params"},
                       "params": [self.params[names[id(p)]] for p in group["params"]]} for group in opt.param_groups]
            stacked = type(opt)(groups)
            for g, group in enumerate(stacked.param_groups):  # a resumed run's optimizer state, stacked
                for j, param in enumerate(group["params"]):
                    states = [a.optimizers()[key].state.get(a.optimizers()[key].param_groups[g]["params"][j])
                              for a in agents]
                    if all(states):
                        stacked.state[param] = {k: (v.clone() if k == "step" else torch.stack([s[k] for s in states]))
                                                for k, v in states[0].items()}
            self.optimizers[key] = stacked
        self.max_norms = {key: MAX_NORMS.get(template.name, {}).get(key, lambda a: None)(template)
                          for key in self.optimizers}
        self.updates = template.updates

    # ---- one update ------------------------------------------------------------------------------

    def per_seed(self, fn: Callable[[Agent, dict], Losses], batch: dict[str, Tensor]) -> Losses:
        """`fn(agent, batch)` on every seed's weights and batch at once: losses and metrics of shape (N,)."""
        def one(params: dict, buffers: dict, part: dict) -> Losses:
            return functional_call(self._call, ({f"agent.{k}": v for k, v in params.items()},
                                                {f"agent.{k}": v for k, v in buffers.items()}), (fn, part))
        return vmap(one, randomness=self.randomness)(self.params, self.buffers, batch)

    def optimize(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        """Backpropagate the sum over seeds of `losses` (optimizer name -> (N,) losses, on disjoint parameters),
        clip each seed's gradient norm per optimizer, and step; return each optimizer's (N,) gradient norms."""
        for key in losses:
            self.optimizers[key].zero_grad(set_to_none=True)
        torch.stack([loss.sum() for loss in losses.values()]).sum().backward()
        norms = {}
        for key in losses:
            optimizer, max_norm = self.optimizers[key], self.max_norms[key]
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            per_param = torch.stack([torch.linalg.vector_norm(p.grad.reshape(self.n, -1), dim=1) for p in params])
            norms[key] = torch.linalg.vector_norm(per_param, dim=0)
            if max_norm:  # clip_grad_norm_'s rule, one seed at a time
                coef = (max_norm / (norms[key] + 1e-6)).clamp(max=1.0)
                for p in params:
                    p.grad.mul_(coef.view(-1, *(1,) * (p.dim() - 1)))
            use_fused_step(optimizer, params[0].device)
            optimizer.step()
        return norms

    def step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """One update of every seed; `batch` holds (N, B, ...) tensors; returns (N,) metrics."""
        return UPDATES[self.template.name](self, batch)

    def stacked(self, prefix: str) -> list[Tensor]:
        """The stacked parameters under `prefix` (a submodule's path and '.'), in `named_parameters` order."""
        return [value for name, value in self.params.items() if name.startswith(prefix)]

    def after_step(self) -> None:
        """The agents' `after_step` on the stack: the update counter and the EMAs of `ema_models`."""
        self.updates += 1
        cfg = self.template.config
        with torch.no_grad():
            for name in self.template.ema_models:
                model = getattr(self.template, name)
                model.updates += 1
                ema, online = self.stacked(f"{name}.model_ema."), self.stacked(f"{name}.model.")
                if getattr(cfg, "ema_warmup", "copy") == "hold":  # the original's rule (the agent's after_step)
                    if self.template.ema_holds_average(model.updates):
                        torch._foreach_lerp_(ema, online, 1.0 - cfg.ema_rate)
                elif model.updates <= model.ema_start:
                    torch._foreach_copy_(ema, online)
                elif model.updates % model.ema_every == 0:
                    torch._foreach_lerp_(ema, online, 1.0 - model.ema_rate)
        if getattr(cfg, "lr_decay_steps", 0):  # IDQL's and DAC's cosine lrs (see their after_step)
            cosine_decay_lrs(self.optimizers, cfg, self.template.decaying_lrs, self.updates)

    def update(self, batch: dict[str, Tensor]) -> list[dict[str, float]]:
        """`step` then `after_step`; each seed's metrics as floats (FloatingPointError on NaN/inf)."""
        metrics = self.step(batch)
        self.after_step()
        return [finite_floats({k: v[i] for k, v in metrics.items()}, f"at {self.template.name} seed index {i} "
                              f"update {self.updates}") for i in range(self.n)]

    # ---- back to N agents ------------------------------------------------------------------------

    @torch.no_grad()
    def sync(self) -> list[Agent]:
        """Copy the stacked state into the N agents (weights, buffers, optimizer states, counters)."""
        for i, agent in enumerate(self.agents):
            own = dict(agent.named_parameters())
            for name, value in self.params.items():
                own[name].copy_(value[i])
            own_buffers = dict(agent.named_buffers())
            for name, value in self.buffers.items():
                own_buffers[name].copy_(value[i])
            for key, stacked in self.optimizers.items():
                opt = agent.optimizers()[key]
                for group, own_group in zip(stacked.param_groups, opt.param_groups):
                    if torch.is_tensor(own_group["lr"]):  # IDQL's decayed lr
                        own_group["lr"].fill_(group["lr"])
                    else:
                        own_group["lr"] = float(group["lr"])
                    for param, own_param in zip(group["params"], own_group["params"]):
                        if param in stacked.state:
                            opt.state[own_param] = {k: (v.clone() if k == "step" else v[i].clone())
                                                    for k, v in stacked.state[param].items()}
            agent.updates = self.updates
            for name in agent.ema_models:
                getattr(agent, name).updates = getattr(self.template, name).updates
        return self.agents


def _bc_update(ens: AgentEnsemble, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    ens.template.train()
    losses, metrics = ens.per_seed(bc_losses, batch)
    return {**metrics, "actor/grad_norm": ens.optimize(losses)["actor"]}


def _diffusion_bc_update(ens: AgentEnsemble, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Diffusion BC: 1 + bc_updates denoising steps, each on its own batch (the seed dimension stays first)."""
    ens.template.actor.model.train()
    losses, norms = [], []
    for part in split_seed_batches(batch, ens.template.batches_per_step):
        loss, metrics = ens.per_seed(diffusion_bc_losses, part)
        norms.append(ens.optimize(loss)["actor"])
        losses.append(metrics["actor/bc_loss"])
    return {"actor/bc_loss": torch.stack(losses).mean(0), "actor/grad_norm": torch.stack(norms).mean(0)}


def _fql_update(ens: AgentEnsemble, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """FQL's default order: all losses on the pre-step networks, the target critic from the pre-step critic,
    then one step of each network."""
    ens.template.flow.model.train()
    losses, metrics = ens.per_seed(fql_losses, batch)
    with torch.no_grad():
        torch._foreach_lerp_(ens.stacked("critic_target."), ens.stacked("critic."), ens.template.config.tau)
    norms = ens.optimize(losses)
    return {**metrics, "flow/grad_norm": norms["flow"], "actor/grad_norm": norms["actor"],
            "critic/grad_norm": norms["critic"]}


def _dql_update(ens: AgentEnsemble, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Diffusion-QL: critic step, then the actor's loss on the stepped critic and its step, the target critic,
    then the denoising-only actor steps on batches of their own."""
    ens.template.actor.model.train()
    first, *bc_parts = split_seed_batches(batch, ens.template.batches_per_step)
    losses, metrics = ens.per_seed(dql_critic_losses, first)
    critic_grad = ens.optimize(losses)["critic"]
    losses, actor_metrics = ens.per_seed(dql_actor_losses, first)
    actor_grad = ens.optimize(losses)["actor"]
    with torch.no_grad():  # 3. target critic
        torch._foreach_lerp_(ens.stacked("critic_target."), ens.stacked("critic."), ens.template.config.tau)
    for part in bc_parts:  # 4. denoising-only actor steps
        ens.optimize(ens.per_seed(diffusion_bc_losses, part)[0])
    return {**actor_metrics, "actor/grad_norm": actor_grad, "critic/loss": metrics["critic/loss"],
            "critic/grad_norm": critic_grad, "critic/q_mean": metrics["critic/q_mean"],
            "critic/target_mean": metrics["critic/target_mean"]}


def _edp_update(ens: AgentEnsemble, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """EDP: (iql: the value's step first), then the policy and both critics step from the pre-step networks'
    losses, then the target critics."""
    ens.template.actor.model.train()
    value_metrics = {}
    if ens.template.config.loss_type == "iql":
        losses, value_metrics = ens.per_seed(edp_value_losses, batch)
        value_metrics["value/grad_norm"] = ens.optimize(losses)["value"]
    losses, metrics = ens.per_seed(edp_losses, batch)
    norms = ens.optimize(losses)
    with torch.no_grad():
        torch._foreach_lerp_(ens.stacked("critic_target."), ens.stacked("critic."), ens.template.config.tau)
    v_mean = {"value/v_mean": metrics.pop("value/v_mean")} if value_metrics else {}
    return {**metrics, "actor/grad_norm": norms["actor"], "critic/grad_norm": torch.hypot(norms["q1"], norms["q2"]),
            **value_metrics, **v_mean}


def _dac_update(ens: AgentEnsemble, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """DAC: the critic's step, the target critics, the actor's step on the new targets, then each seed's eta by
    dual ascent on its BC loss."""
    cfg = ens.template.config
    ens.template.actor.model.train()
    losses, metrics = ens.per_seed(dac_critic_losses, batch)
    critic_grad = ens.optimize(losses)["critic"]
    with torch.no_grad():
        torch._foreach_lerp_(ens.stacked("critic_target."), ens.stacked("critic."), cfg.tau)
    losses, actor_metrics = ens.per_seed(dac_actor_losses, batch)
    actor_grad = ens.optimize(losses)["actor"]
    eta = ens.buffers["eta"]
    if cfg.eta_lr > 0:
        with torch.no_grad():
            eta.add_(cfg.eta_lr * (actor_metrics["actor/bc_loss"] - cfg.bc_threshold).clamp(-1.0, 1.0))
            eta.clamp_(cfg.eta_min, cfg.eta_max)
    return {**actor_metrics, "actor/eta": eta.clone(), "actor/grad_norm": actor_grad, **metrics,
            "critic/grad_norm": critic_grad}


def _idql_update(ens: AgentEnsemble, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """IDQL: per critic batch a value step, a critic step on the stepped value and the target critic; then the
    behavior model's denoising step on the first batch."""
    parts = split_seed_batches(batch, ens.template.batches_per_step)
    for part in parts:
        losses, value_metrics = ens.per_seed(idql_value_losses, part)
        ens.optimize(losses)
        losses, critic_metrics = ens.per_seed(idql_critic_losses, part)
        ens.optimize(losses)
        with torch.no_grad():
            torch._foreach_lerp_(ens.stacked("critic_target."), ens.stacked("critic."), ens.template.config.tau)
    ens.template.actor.model.train()
    losses, metrics = ens.per_seed(diffusion_bc_losses, parts[0])
    actor_grad = ens.optimize(losses)["actor"]
    return {**metrics, "actor/grad_norm": actor_grad, **value_metrics, **critic_metrics}


def split_seed_batches(batch: dict[str, Tensor], count: int) -> list[dict[str, Tensor]]:
    """`Agent.split_batches` on an ensemble's batch: the rows (dim 1) in `count` parts, the seeds first."""
    parts = {key: value.chunk(count, dim=1) for key, value in batch.items()}
    return [{key: chunks[i] for key, chunks in parts.items()} for i in range(count)]


UPDATES: dict[str, Callable[[AgentEnsemble, dict[str, Tensor]], dict[str, Tensor]]] = {
    "bc": _bc_update, "diffusion_bc": _diffusion_bc_update, "fql": _fql_update, "dql": _dql_update,
    "idql": _idql_update, "edp": _edp_update, "dac": _dac_update}
# Optimizers whose gradient a separate run clips, and the norm it clips to
MAX_NORMS: dict[str, dict[str, Callable[[Agent], float | None]]] = {
    "diffusion_bc": {"actor": lambda agent: agent.actor.grad_clip_norm},
    "fql": {"flow": lambda agent: agent.flow.grad_clip_norm},
    "dql": {"actor": lambda agent: agent.actor.grad_clip_norm, "critic": lambda agent: agent.config.grad_norm or None},
    "idql": {"actor": lambda agent: agent.actor.grad_clip_norm},
    "edp": {"actor": lambda agent: agent.actor.grad_clip_norm, "q1": lambda agent: agent.config.grad_norm or None,
            "q2": lambda agent: agent.config.grad_norm or None, "value": lambda agent: agent.config.grad_norm or None},
    "dac": {"actor": lambda agent: agent.actor.grad_clip_norm, "critic": lambda agent: agent.config.grad_norm or None}}


# ---- training: train.py with seeds=[...] or ensemble=N ----------------------------------------------------

def ensemble_seeds(cfg: DictConfig) -> list[int] | None:
    """The seeds `cfg` trains as one ensemble (`seeds`, or `ensemble=N`: seed, seed+1, ..., seed+N-1); None for
    one ordinary run. One clear error where the two disagree or a seed repeats."""
    seeds, n = cfg.get("seeds"), cfg.get("ensemble", 1)
    if seeds is None:
        return None if n == 1 else [int(cfg.seed) + i for i in range(n)]
    seeds = [int(seed) for seed in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={seeds}: an ensemble trains one or more distinct seeds")
    if n not in (1, len(seeds)):
        raise ValueError(f"ensemble={n} and seeds={seeds} disagree: give one of them")
    return seeds


def seed_config(cfg: DictConfig, seed: int) -> DictConfig:
    """`cfg` as the ordinary single-seed run of `seed` (its run_dir, seeds null, ensemble 1)."""
    one = copy.deepcopy(cfg)
    one.seed, one.seeds, one.ensemble = seed, None, 1
    return one


def train_ensemble(cfg: DictConfig, seeds: list[int]) -> list[Path]:
    """Train (or resume) `seeds` of `cfg`'s algorithm as one `AgentEnsemble`; return the N checkpoints' paths.

    Each seed has its own initial weights (seeded as its separate run), batches (its own generator), noise
    (vmap draws per seed), run folder, TensorBoard and checkpoint in today's format; a rerun resumes all seeds.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("seeds / ensemble train in one process: launch without torchrun")
    device = resolve_device(cfg.device)
    limit = wall_budget(cfg.max_minutes)
    keep = cfg.keep_checkpoints
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep_checkpoints={keep}: 1 keeps checkpoint.pt alone, N > 1 the N latest besides")
    if cfg.compile:
        raise ValueError("compile=true is not supported with seeds / ensemble (vmapped updates)")
    algo_cls = get_algorithm(cfg.algo.name)
    if algo_cls.name not in UPDATES:
        raise ValueError(f"seed ensembles support {', '.join(sorted(UPDATES))}, not {algo_cls.name}")
    if getattr(make_config(algo_cls.Config, OmegaConf.to_container(cfg.algo.params, resolve=True)),
               "sequential_steps", False):
        raise ValueError(f"{algo_cls.name} with sequential_steps=true is not supported by seed ensembles")
    per_seed = [seed_config(cfg, seed) for seed in seeds]
    run_dirs = [Path(c.run_dir) for c in per_seed]
    if len(set(run_dirs)) != len(run_dirs):
        raise ValueError(f"the seeds {seeds} share run_dir={run_dirs[0]}: leave run_dir to its default or put "
                         "${seed} in it")
    with contextlib.ExitStack() as stack:
        for run_dir in run_dirs:  # one run per folder, as a separate run holds it
            stack.enter_context(exclusive_run_dir(run_dir))
        return _train_ensemble(cfg, seeds, per_seed, run_dirs, device, limit, algo_cls)


def _train_ensemble(cfg: DictConfig, seeds: list[int], per_seed: list[DictConfig], run_dirs: list[Path],
                    device: torch.device, limit: float | None, algo_cls: type[Agent]) -> list[Path]:
    """`train_ensemble` inside the held run folders."""
    paths = [run_dir / "checkpoint.pt" for run_dir in run_dirs]
    if device.type == "cpu" and cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    minari_dataset = load_dataset(cfg.dataset)
    env_id = cfg.env_id or dataset_env_id(minari_dataset)
    configs = [OmegaConf.to_container(c, resolve=True) for c in per_seed]
    found = [path for path in paths if path.exists()] if cfg.resume else []
    if found and len(found) != len(paths):
        missing = [str(path) for path in paths if path not in found]
        raise ValueError(f"{found[0]} exists but {missing[0]} does not: an ensemble resumes all its seeds or none; "
                         "pass resume=false or train the seeds apart")
    resumed = [load_checkpoint(path) for path in found]
    for path, state, config in zip(found, resumed, configs):
        if not {"algo", "dataset_id", "step", "rng", "run_config"} <= state.keys():
            raise ValueError(f"{path} is not a training checkpoint; choose another run_dir or pass resume=false")
        if (state["algo"], state["dataset_id"]) != (algo_cls.name, cfg.dataset):
            raise ValueError(f"{path} holds {state['algo']} on {state['dataset_id']}, not {algo_cls.name} on "
                             f"{cfg.dataset}; choose another run_dir or pass resume=false")
        changed = changed_settings(state["run_config"], config)
        if changed:
            raise ValueError(f"{path} was trained with other settings ({', '.join(changed)}); choose another "
                             "run_dir or pass resume=false")
    if len({state["step"] for state in resumed}) > 1:
        raise ValueError(f"the checkpoints of seeds {seeds} hold different numbers of updates "
                         f"({[state['step'] for state in resumed]}): resume them apart")
    params = OmegaConf.to_container(cfg.algo.params, resolve=True)
    seed_everything(seeds[0])
    data = algo_cls.training_data(minari_dataset, make_config(algo_cls.Config, params), device=device,
                                  normalizer_state=None if not resumed else {"obs": resumed[0]["obs_normalizer"]})
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    if not resumed:
        agents = []
        for seed in seeds:  # each seed's initial weights from its own seed
            seed_everything(seed)
            agents.append(new_agent(algo_cls, params, minari_dataset, data, env_id=env_id, device=device))
        start, walls, evals = 0, [0.0] * len(seeds), [0.0] * len(seeds)
    else:
        start = resumed[0]["step"]
        if start >= int(cfg.steps):
            print(f"{paths[0]} and the other seeds' checkpoints already hold {start} updates (steps={cfg.steps}): "
                  "nothing to train")
            return paths
        walls = [state.get("wall_seconds", 0.0) for state in resumed]
        evals = [state.get("eval_seconds", 0.0) for state in resumed]
        if limit is not None and walls[0] >= limit:
            print(f"{paths[0]} has trained {walls[0] / 60:.1f} minutes (max_minutes={cfg.max_minutes}): nothing to train")
            return paths
        acting = act_only_settings(algo_cls.Config)
        agents = []
        for state, generator in zip(resumed, generators):
            kept = {key: params[key] for key in acting if key in params and key in state["config"]}
            agents.append(algo_cls.from_checkpoint({**state, "config": {**state["config"], **kept}}, device))
            _set_rng_state(state["rng"], generator)
    clock = time.perf_counter() - walls[0]
    data.map_actions(agents[0].normalize_action)  # the networks see actions in [-1, 1]
    ensemble = AgentEnsemble(agents)
    total, n = int(cfg.steps), len(seeds)
    writers = [SummaryWriter(str(run_dir / "tb"), purge_step=start + 1 if start else 0) for run_dir in run_dirs]
    if start == 0:
        for writer, one in zip(writers, per_seed):
            writer.add_text("config", f"```\n{OmegaConf.to_yaml(one, resolve=True)}\n```")
    step_fn = ensemble.step
    if device.type == "cuda" and bool(cfg.cuda_graph):
        step_fn = CudaGraphStep(ensemble.step, ensemble.optimizers.values())
    rows = int(cfg.batch_size) * agents[0].batches_per_step
    sums: dict[str, Tensor] = {}
    summed = 0
    bar = tqdm(range(start, total), initial=start, total=total, dynamic_ncols=True, mininterval=1.0,
               desc=f"{algo_cls.name} {cfg.dataset} seeds {','.join(map(str, seeds))}")

    def checkpoint() -> None:
        """Every seed's ordinary checkpoint after update `done`."""
        ensemble.sync()
        for i, agent in enumerate(agents):
            agent.save(paths[i], step=done, rng=_rng_state(generators[i]), run_config=configs[i],
                       wall_seconds=time.perf_counter() - clock, eval_seconds=evals[i])
            if int(cfg.keep_checkpoints) > 1:
                keep_latest(paths[i], run_dirs[i] / "checkpoints", done, int(cfg.keep_checkpoints))
            writers[i].flush()

    done = start
    with Preemption(checkpoint) as preemption:
        for step in bar:
            preemption.safe = False
            parts = [agents[0].check_batch(data.sample(rows, generator)) for generator in generators]
            metrics = step_fn({key: torch.stack([part[key] for part in parts]) for key in parts[0]})
            ensemble.after_step()
            done = step + 1
            out_of_time = limit is not None and time.perf_counter() - clock >= limit
            last = done == total or out_of_time
            preemption.safe = True
            if preemption.requested:
                preemption.save_and_forward()
            for key, value in metrics.items():  # (N,) per metric, summed on the device
                sums[key] = sums[key] + value if key in sums else value.clone()
            summed += 1
            if done % cfg.log_every == 0 or last:
                for i in range(n):
                    means = finite_floats({key: value[i] / summed for key, value in sums.items()},
                                          f"for seed {seeds[i]} in the {summed} updates before update {done}")
                    for key, value in means.items():
                        writers[i].add_scalar(f"train/{key}", value, done)
                sums.clear()
                summed = 0
            if cfg.eval_every and (done % cfg.eval_every == 0 or last):
                ensemble.sync()
                for i, agent in enumerate(agents):
                    eval_start = time.perf_counter()
                    result = evaluate(agent, env_id, episodes=cfg.eval_episodes, seed=seeds[i] + 100, progress=False)
                    bar.write(f"seed {seeds[i]} step {done}: {log_evaluation(writers[i], result, done)}")
                    evals[i] += time.perf_counter() - eval_start
            if done % cfg.checkpoint_every == 0 or last:
                checkpoint()
            if out_of_time:
                bar.write(f"max_minutes={cfg.max_minutes} reached after {done} updates")
                break
    bar.close()
    for writer in writers:
        writer.close()
    return paths
