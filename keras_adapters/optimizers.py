"""Per-variable learning-rate multipliers for any Keras optimizer.

`lr_multipliers(optimizer, {rule: multiplier})` returns an optimizer that
updates every variable exactly as `optimizer` would, except that the learning
rate a variable's update sees is multiplied by the multiplier of the rule that
matches it. It scales the learning rate, not the gradient: Adam-style
optimizers divide the gradient's scale away, a learning rate they do not.

A rule is:

- a string: a regular expression that must `re.fullmatch` `variable.path`
  (`r".*/value/lora_b"`, `r"logits/.*"`);
- `role(name)`: the variables of an attention role (`role("value")`: the
  adapter variables of every value projection, or its kernel and bias when
  it is fine-tuned in full), or of an adapter variable name
  (`role("lora_b")`);
- a callable `variable -> bool`.

Recipes: `loraplus` (LoRA+, the `B` factors at `ratio` times the rate) and
`attention_lr` (a rate per attention role, the attention paper's
eta_V = lambda * eta_Q). They compose, and their multipliers multiply.
See `docs/per_matrix_learning_rates.md`.
"""

import copy
import re
import weakref

import keras
from keras import ops

from keras_adapters import _keras_internals as internals
from keras_adapters import _validation
from keras_adapters import roles
from keras_adapters import targeting
from keras_adapters.adapters.base import ADAPTER_METHODS

variable_role = roles.path_role


def _factor_role_names(role_name):
    """The variable names adapter methods declare under `role_name`
    (`Adapter.roles`, such as LoRA's `{"B": "lora_b"}`)."""
    return {
        cls.roles[role_name]
        for cls in ADAPTER_METHODS.values()
        if role_name in cls.roles
    }


def _known_role_names():
    """Attention roles, and the factor roles and variable names the
    registered adapter methods declare (`roles`, `variable_axes`,
    `factor_names`)."""
    names = list(roles.ATTENTION_ROLES)
    for cls in ADAPTER_METHODS.values():
        names += [*cls.roles, *cls.roles.values(), *cls.variable_axes]
        names += list(getattr(cls, "factor_names", ()))
    return list(dict.fromkeys(names))


class Role:
    """A rule: the variables of an attention role or adapter variable name.

    Create it with `ka.role(name)`.
    """

    def __init__(self, name):
        known = _known_role_names()
        if not isinstance(name, str) or name not in known:
            raise ValueError(
                "`role` takes an attention role "
                f"{list(roles.ATTENTION_ROLES)}, a factor role or an adapter "
                "variable name of a registered adapter method "
                f"{sorted(set(known) - set(roles.ATTENTION_ROLES))}; received "
                f"{name!r}."
            )
        self.name = name

    @property
    def is_attention_role(self):
        return self.name in roles.ATTENTION_ROLES

    def matches(self, variable):
        path = variable.path or ""
        if self.is_attention_role:
            return variable_role(path) == self.name
        # A named adapter's variables are `<name>.<adapter name>`.
        name = path.rsplit("/", 1)[-1].split(".", 1)[0]
        return name == self.name or name in _factor_role_names(self.name)

    def __eq__(self, other):
        return isinstance(other, Role) and other.name == self.name

    def __hash__(self):
        return hash((Role, self.name))

    def __repr__(self):
        return f"role({self.name!r})"


def role(name: str) -> Role:
    """A learning-rate rule selecting variables by attention role or name.

    `role("query")`, `role("key")`, `role("value")` and
    `role("attention_output")` select the trainable variables of the
    attention projections with that role, on every architecture
    `ka.attention()` supports: the adapter variables of an adapted
    projection, or the kernel and bias of a projection fine-tuned in full
    (`ka.attention_full`). A factor role that adapter methods declare in
    `Adapter.roles` selects those variables of every method: `role("B")` is
    every `B` factor (LoRA's `lora_b`), `role("A")` every `A`. A variable
    name a registered adapter method declares (`Adapter.variable_axes`,
    `factor_names` or `roles`) selects those variables by name:
    `role("lora_b")`, `role("hut_a")`.

    Args:
        name: an attention role (`"query"`, `"key"`, `"value"`,
            `"attention_output"`), a factor role (`"A"`, `"B"`), or an
            adapter variable name (`"lora_a"`, `"lora_b"`, `"hut_b"`, ...).

    Returns:
        A rule for `ka.optimizers.lr_multipliers`.

    Raises:
        ValueError: for any other name (the message lists the known ones),
            so that a typo fails here rather than when the optimizer is
            built.

    Example:

    >>> import keras_adapters as ka
    >>> ka.role("value")
    role('value')
    """
    return Role(name)


class _PathRule:
    def __init__(self, pattern):
        try:
            self.regex = re.compile(pattern)
        except re.error as error:
            raise ValueError(
                f"Rule {pattern!r} is not a valid regular expression: {error}."
            ) from None
        self.pattern = pattern

    def matches(self, variable):
        return self.regex.fullmatch(variable.path or "") is not None

    def __repr__(self):
        return repr(self.pattern)


class _CallableRule:
    def __init__(self, function):
        self.function = function

    def matches(self, variable):
        return bool(self.function(variable))

    def __repr__(self):
        return f"callable {getattr(self.function, '__name__', repr(self.function))}"


def _rule(key):
    """The rule object for a key of the multipliers mapping."""
    if isinstance(key, Role):
        return key
    if isinstance(key, str):
        return _PathRule(key)
    if isinstance(key, targeting.Target):
        raise ValueError(
            f"Rule {key!r} is a layer target for enable_adapter; learning-rate "
            "rules select variables: use ka.role('value') instead of "
            "ka.attention('value')."
        )
    if callable(key) and not isinstance(key, type):
        return _CallableRule(key)
    raise ValueError(
        f"Invalid rule {key!r} of type {type(key).__name__}; a rule is a "
        "regular expression (str) that fullmatches `variable.path`, "
        "ka.role(...), or a callable `variable -> bool`."
    )


def _check_multiplier(rule, value):
    return _validation.check_number(
        f"multiplier of rule {rule!r}",
        value,
        low=0,
        low_inclusive=False,
        allowed="a finite number > 0",
    )


def _parse(multipliers):
    """`((rule, multiplier), ...)` for a `{rule: multiplier}` mapping."""
    if not isinstance(multipliers, dict):
        raise ValueError(
            "`multipliers` must be a dict {rule: multiplier}, e.g. "
            f"{{ka.role('value'): 4.0}}; received {multipliers!r}."
        )
    return tuple((_rule(k), _check_multiplier(k, v)) for k, v in multipliers.items())


def _rule_config(rule):
    if isinstance(rule, Role):
        return {"role": rule.name}
    if isinstance(rule, _PathRule):
        return {"regex": rule.pattern}
    name = keras.saving.get_registered_name(rule.function)
    if keras.saving.get_registered_object(name) is not rule.function:
        raise ValueError(
            f"Rule {rule!r} cannot be serialized: register the function with "
            "@keras.saving.register_keras_serializable(), or use a regex or "
            "ka.role(...) rule."
        )
    return {"callable": name}


def _rule_from_config(config, custom_objects=None):
    if "role" in config:
        return Role(config["role"])
    if "regex" in config:
        return config["regex"]
    function = keras.saving.get_registered_object(
        config["callable"], custom_objects=custom_objects
    )
    if function is None:
        raise ValueError(
            f"Unknown registered rule function {config['callable']!r}; import "
            "the module that registers it, or pass it in `custom_objects`."
        )
    return function


def _describe_variables(variables, limit=30):
    rows = []
    for variable in variables[:limit]:
        found = variable_role(variable.path)
        rows.append(f"  {variable.path}" + (f"  (role: {found})" if found else ""))
    if len(variables) > limit:
        rows.append(f"  ... and {len(variables) - limit} more")
    return "\n".join(rows)


@keras.saving.register_keras_serializable(package="keras_adapters")
class LearningRateMultipliers(keras.optimizers.Optimizer):
    """Gives any Keras optimizer a learning-rate multiplier per variable.

    Wraps `optimizer` (SGD, Adam, AdamW, Lion, ... with its own learning rate
    or schedule, clipping, EMA, gradient accumulation) and keeps its single
    set of state: the wrapper's `variables` are the wrapped optimizer's. When
    it is built, every variable gets a multiplier: for each rule set, the
    multiplier of the rule that matches it (1 if none does), multiplied over
    the rule sets. Each update of variable `v` then sees the learning rate
    `learning_rate * m_v`, and, with `scale_weight_decay=True`, so does
    Keras' decoupled weight decay (`v -= v * weight_decay * learning_rate *
    m_v`), as with one optimizer per parameter group in PyTorch. With every
    multiplier 1 the updates are bit for bit those of `optimizer`.

    Use `lr_multipliers(...)`, `loraplus(...)` or `attention_lr(...)` to
    create it. Wrapping a `LearningRateMultipliers` again adds a rule set:
    multipliers of different sets multiply.

    Args:
        optimizer: a Keras optimizer that is not built yet (not a
            `LossScaleOptimizer` or `MultiOptimizer`: `compile` adds the loss
            scale optimizer around this one under `mixed_float16`), or a
            `LearningRateMultipliers` to add a rule set to.
        multipliers: dict `{rule: multiplier}`; see `lr_multipliers`.
        scale_weight_decay: bool; whether decoupled weight decay uses the
            multiplied learning rate (the default) or the base one.
        name: optional name of the wrapper.

    Raises:
        ValueError: when it is built, if two rules of one set match the same
            variable or a rule matches none of the variables.
    """

    def __init__(
        self,
        optimizer,
        multipliers,
        scale_weight_decay: bool = True,
        name: str | None = None,
        **kwargs,
    ):
        if kwargs:
            raise ValueError(
                f"LearningRateMultipliers does not take {sorted(kwargs)}; set "
                "them on the wrapped optimizer."
            )
        scale_weight_decay = _validation.check_bool(
            "scale_weight_decay", scale_weight_decay
        )
        rule_set = _parse(multipliers)
        rule_sets, wrapper = (), None
        if isinstance(optimizer, LearningRateMultipliers):
            wrapper, optimizer = optimizer, optimizer.inner_optimizer
            if wrapper.built:
                raise ValueError(
                    f"Optimizer '{wrapper.name}' is already built; add rules "
                    "before compiling or training with it."
                )
            if wrapper.scale_weight_decay != scale_weight_decay:
                raise ValueError(
                    f"Optimizer '{wrapper.name}' has scale_weight_decay="
                    f"{wrapper.scale_weight_decay}; pass the same value "
                    f"(received scale_weight_decay={scale_weight_decay})."
                )
            rule_sets = wrapper.rule_sets
        _check_inner(optimizer, allowed_owner=wrapper)
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = optimizer
        self.scale_weight_decay = scale_weight_decay
        # Plain Python data, kept away from Keras' and TF's attribute tracking.
        object.__setattr__(self, "rule_sets", rule_sets + (rule_set,))
        # Per variable, in the order `build` received them.
        object.__setattr__(self, "multipliers", None)
        # A weak reference: Keras' saving walks every attribute of the wrapped
        # optimizer, and must not walk back to this wrapper.
        object.__setattr__(optimizer, "_keras_adapters_lr_owner", weakref.ref(self))

    # The wrapped optimizer owns the learning rate, the iteration count, the
    # loss scale factor and all state.

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        if hasattr(self, "inner_optimizer"):
            self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @property
    def loss_scale_factor(self):
        inner = getattr(self, "inner_optimizer", None)
        return None if inner is None else inner.loss_scale_factor

    @loss_scale_factor.setter
    def loss_scale_factor(self, value):
        # `LossScaleOptimizer` clears it on the optimizer it wraps (this one);
        # the wrapped optimizer is the one that would unscale gradients.
        inner = getattr(self, "inner_optimizer", None)
        if inner is not None:
            inner.loss_scale_factor = value

    @property
    def variables(self):
        return self.inner_optimizer.variables

    def save_own_variables(self, store):
        # The state is the wrapped optimizer's, which Keras saves (and
        # loads) as this optimizer's `inner_optimizer`; saving it here too
        # would store it twice.
        pass

    def load_own_variables(self, store):
        pass

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def build(self, var_list):
        if self.built:
            return
        var_list = list(var_list)
        multipliers = [1.0] * len(var_list)
        for rule_set in self.rule_sets:
            for index, m in enumerate(_resolve(rule_set, var_list, self.name)):
                multipliers[index] *= m
        object.__setattr__(self, "multipliers", tuple(multipliers))
        self.inner_optimizer.build(var_list)
        self._install_hooks()
        super().build(var_list)

    def multiplier(self, variable):
        """The learning-rate multiplier of `variable` (after `build`)."""
        if not self.built:
            raise ValueError(
                f"Optimizer '{self.name}' is not built; its multipliers are "
                "resolved by build(variables), which compile/fit call."
            )
        index = internals.optimizer_variable_index(self.inner_optimizer, variable)
        return self.multipliers[index]

    def _install_hooks(self):
        """Routes the wrapped optimizer's updates through the multipliers.

        Every Keras optimizer updates variable `v` in
        `update_step(gradient, v, learning_rate)` and applies decoupled
        weight decay in `_apply_weight_decay(variables)`. The wrapped
        instance gets its own versions of both, which look up `v`'s static
        multiplier by the optimizer's variable index (no branching on tensor
        values, so they trace under `jit_compile` on every backend).
        """
        inner = self.inner_optimizer
        multipliers = self.multipliers
        scale_weight_decay = self.scale_weight_decay

        def multiplier(variable):
            return multipliers[internals.optimizer_variable_index(inner, variable)]

        def wrap_update_step(update_step):
            def scaled_update_step(gradient, variable, learning_rate):
                m = multiplier(variable)
                if m != 1.0:
                    learning_rate = ops.multiply(learning_rate, m)
                return update_step(gradient, variable, learning_rate)

            return scaled_update_step

        def wrap_weight_decay(apply_weight_decay):
            def scaled_apply_weight_decay(variables):
                weight_decay = inner.weight_decay
                if not scale_weight_decay or weight_decay is None:
                    return apply_weight_decay(variables)
                groups = {}
                for variable in variables:
                    groups.setdefault(multiplier(variable), []).append(variable)
                for m, group in groups.items():
                    # Keras decays `v -= v * weight_decay * learning_rate`;
                    # the group's rate is `learning_rate * m`.
                    inner.weight_decay = weight_decay * m
                    try:
                        apply_weight_decay(group)
                    finally:
                        inner.weight_decay = weight_decay

            return scaled_apply_weight_decay

        internals.override_optimizer_updates(inner, wrap_update_step, wrap_weight_decay)

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            if trainable_variables is None:
                raise ValueError(
                    "When passing `grads` without `variables`, the optimizer "
                    "must already be built; call optimizer.build(variables)."
                )
            self.build(trainable_variables)
        return self.inner_optimizer.apply(grads, trainable_variables)

    def apply_gradients(self, grads_and_vars):
        grads, trainable_variables = zip(*grads_and_vars, strict=True)
        self.apply(grads, trainable_variables)
        return internals.optimizer_iterations_variable(self.inner_optimizer)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        if not self.built:
            raise ValueError(
                f"To call `stateless_apply`, optimizer '{self.name}' must be "
                "built; call optimizer.build(trainable_variables)."
            )
        return self.inner_optimizer.stateless_apply(
            optimizer_variables, grads, trainable_variables
        )

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "multipliers": [
                [[_rule_config(rule), m] for rule, m in rule_set]
                for rule_set in self.rule_sets
            ],
            "scale_weight_decay": self.scale_weight_decay,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # Keras' optimizers replace parts of the config they are given.
        config = copy.deepcopy(config)
        optimizer = keras.saving.deserialize_keras_object(
            config.pop("optimizer"), custom_objects=custom_objects
        )
        rule_sets = config.pop("multipliers")
        name = config.pop("name", None)
        for i, rule_set in enumerate(rule_sets):
            rules = {_rule_from_config(rule, custom_objects): m for rule, m in rule_set}
            last = i == len(rule_sets) - 1
            optimizer = cls(optimizer, rules, name=name if last else None, **config)
        return optimizer


def _check_inner(optimizer, allowed_owner=None):
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise ValueError(
            "`optimizer` must be a Keras optimizer instance, such as "
            f"keras.optimizers.AdamW(1e-4); received {optimizer!r}."
        )
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        raise ValueError(
            "Wrap the optimizer itself, not a LossScaleOptimizer: "
            "lr_multipliers(AdamW(...), ...); under the mixed_float16 policy "
            "compile() adds the LossScaleOptimizer around it."
        )
    if isinstance(optimizer, keras.optimizers.MultiOptimizer):
        raise ValueError(
            "A MultiOptimizer delegates to other optimizers; wrap each of them "
            "instead, or use one optimizer with lr_multipliers."
        )
    if optimizer.built:
        raise ValueError(
            f"Optimizer '{optimizer.name}' is already built; wrap a fresh "
            "optimizer, before compile() or training."
        )
    owner = getattr(optimizer, "_keras_adapters_lr_owner", None)
    owner = owner() if owner is not None else None
    if owner is not None and owner is not allowed_owner:
        raise ValueError(
            f"Optimizer '{optimizer.name}' is already wrapped by "
            f"'{owner.name}'; wrap that wrapper to add rules, or use a fresh "
            "optimizer."
        )


def _resolve(rule_set, variables, name):
    """Per-variable multipliers of one rule set; checks overlaps and misses."""
    matched_by = [None] * len(variables)
    multipliers = [1.0] * len(variables)
    for rule, m in rule_set:
        hits = [i for i, v in enumerate(variables) if rule.matches(v)]
        if not hits:
            raise ValueError(
                f"Learning-rate rule {rule!r} (x{m:g}) of optimizer '{name}' "
                f"matches none of the {len(variables)} variables it trains. "
                f"They are:\n{_describe_variables(variables)}"
            )
        for i in hits:
            if matched_by[i] is not None:
                other, other_m = matched_by[i]
                raise ValueError(
                    f"Variable '{variables[i].path}' is matched by two "
                    f"learning-rate rules of optimizer '{name}': {other!r} "
                    f"(x{other_m:g}) and {rule!r} (x{m:g}). Make the rules "
                    "disjoint, or put them in separate lr_multipliers() calls "
                    "to multiply them."
                )
            matched_by[i] = (rule, m)
            multipliers[i] = m
    return multipliers


def lr_multipliers(
    optimizer: keras.optimizers.Optimizer,
    multipliers: dict,
    *,
    scale_weight_decay: bool = True,
) -> "LearningRateMultipliers":
    """Gives `optimizer` a learning-rate multiplier per variable.

    The returned optimizer updates each variable as `optimizer` would with
    its learning rate (a float or a `keras.optimizers.schedules` schedule)
    multiplied by the variable's multiplier. It keeps one set of optimizer
    state (the wrapped optimizer's), compiles with `jit_compile=True` on JAX
    and TensorFlow, works under `mixed_float16` (compile wraps it in a
    `LossScaleOptimizer`), serializes with the model, and is saved and
    restored with `model.save` and `model.save_weights`.

    The rules are resolved when the optimizer is built (by `fit`), against
    the variables it trains. Each rule must match at least one of them, and
    no variable may be matched by two rules of the same mapping; variables
    matched by no rule keep multiplier 1. To multiply rules (LoRA+ on top of
    a value-role ratio), wrap again: `lr_multipliers(lr_multipliers(opt,
    a), b)`.

    Args:
        optimizer: an unbuilt Keras optimizer (or a `LearningRateMultipliers`
            to add a rule set to).
        multipliers: dict `{rule: multiplier}`. A rule is a regular
            expression (str) that must fullmatch `variable.path`, a
            `ka.role(...)`, or a callable `variable -> bool`; a multiplier is
            a finite number > 0.
        scale_weight_decay: bool. With True (the default), decoupled weight
            decay uses the multiplied rate, `v -= v * weight_decay * lr * m`,
            as one optimizer (or PyTorch parameter group) per rate would.
            With False, it uses the base rate `lr` for every variable.

    Returns:
        A `LearningRateMultipliers` optimizer.

    Example:

    ```python
    import keras
    import keras_adapters as ka

    optimizer = ka.optimizers.lr_multipliers(
        keras.optimizers.AdamW(1e-4),
        {ka.role("value"): 4.0, r"logits/.*": 10.0},
    )
    ```
    """
    return LearningRateMultipliers(
        optimizer, multipliers, scale_weight_decay=scale_weight_decay
    )


def _check_ratio(name, value):
    return _validation.check_number(
        name, value, low=0, low_inclusive=False, allowed="a finite number > 0"
    )


def loraplus(
    optimizer: keras.optimizers.Optimizer,
    ratio: float = 16.0,
    *,
    scale_weight_decay: bool = True,
) -> "LearningRateMultipliers":
    """LoRA+: the LoRA `B` factors learn `ratio` times faster than `A`.

    Every `B` factor gets multiplier `ratio`: the variables that adapter
    methods declare under the role `"B"` (`Adapter.roles`; LoRA's `lora_b`,
    also under other adapter names, `lora_b.<name>`). Everything else
    (the `A` factors, a trained head) keeps the base rate, so the base
    learning rate is LoRA+'s eta_A. LoRA+ recommends `ratio = 16` (2^4) as a
    default; larger for harder tasks, with a lower base rate.

    Args:
        optimizer: an unbuilt Keras optimizer, or a `LearningRateMultipliers`
            (e.g. from `attention_lr`) whose multipliers this multiplies.
        ratio: finite number > 0, eta_B / eta_A.
        scale_weight_decay: see `lr_multipliers`.

    Returns:
        A `LearningRateMultipliers` optimizer. Building it raises an error if
        the model has no LoRA `B` factor among its trainable variables.

    Example:

    ```python
    optimizer = ka.optimizers.loraplus(keras.optimizers.AdamW(5e-5), ratio=16)
    ```

    Reference:
        Hayou, Ghosh and Yu, "LoRA+: Efficient Low Rank Adaptation of Large
        Models", ICML 2024.
    """
    ratio = _check_ratio("ratio", ratio)
    return lr_multipliers(
        optimizer, {role("B"): ratio}, scale_weight_decay=scale_weight_decay
    )


def attention_lr(
    optimizer: keras.optimizers.Optimizer,
    value_ratio: float,
    query_ratio: float = 1.0,
    key_ratio: float = 1.0,
    output_ratio: float = 1.0,
    *,
    scale_weight_decay: bool = True,
) -> LearningRateMultipliers:
    """A learning rate per attention role: eta_V = `value_ratio` * eta.

    Every trainable variable of a projection with a given role (its adapter
    variables, both factors of a LoRA, or its kernel and bias when it is
    fine-tuned in full) gets that role's ratio; other variables (a
    classification head) keep the base rate. A ratio of 1 adds no rule, so
    `attention_lr(opt, value_ratio=1)` updates exactly as `opt`; a ratio
    other than 1 for a role with no trainable variable is an error when the
    optimizer is built.

    Args:
        optimizer: an unbuilt Keras optimizer, or a `LearningRateMultipliers`
            whose multipliers these multiply.
        value_ratio: finite number > 0, the paper's lambda = eta_V / eta_Q.
        query_ratio: ratio of the query projections.
        key_ratio: ratio of the key projections.
        output_ratio: ratio of the attention output projections.
        scale_weight_decay: see `lr_multipliers`.

    Returns:
        A `LearningRateMultipliers` optimizer.

    Example:

    ```python
    # eta_V = 4 eta_Q, and LoRA+ on top: the value B factors get 64x.
    optimizer = ka.optimizers.loraplus(
        ka.optimizers.attention_lr(keras.optimizers.AdamW(1e-4), value_ratio=4),
        ratio=16,
    )
    ```

    Reference:
        Yao et al., "Theoretical Insights into Fine-Tuning Attention
        Mechanism: Generalization and Optimization", IJCAI 2025.
    """
    ratios = {
        "query": _check_ratio("query_ratio", query_ratio),
        "key": _check_ratio("key_ratio", key_ratio),
        "value": _check_ratio("value_ratio", value_ratio),
        "attention_output": _check_ratio("output_ratio", output_ratio),
    }
    rules = {role(name): r for name, r in ratios.items() if r != 1.0}
    return lr_multipliers(optimizer, rules, scale_weight_decay=scale_weight_decay)
