"""The 2-D (input axes x output axes) view of a projection kernel."""

import math
import string

from keras import ops


class UnsupportedLayerError(ValueError):
    """Raised when an adapter cannot attach to a layer."""


class KernelView:
    """The 2-D (input axes x output axes) view of a projection kernel.

    A `Dense` kernel is already a `(d_in, d_out)` matrix. An `EinsumDense`
    kernel can have more axes: KerasHub's BERT query kernel is
    `(hidden, heads, head_dim)` and Gemma's is `(heads, hidden, head_dim)`.
    Its axes that contract with the inputs are the input axes, the ones that
    reach the outputs are the output axes, and the 2-D view is the kernel
    transposed to (input axes, output axes) and reshaped to
    `(prod(input sizes), prod(output sizes))`. This is the matrix of the
    flattened projection, the one Hugging Face PEFT factorizes.

    A view knows shapes and equations only; `FloatKernel` and
    `QuantizedKernel` add the layer's frozen kernel.

    Args:
        kernel_shape: the kernel's logical shape (int4 kernels are stored
            packed; this is the unpacked shape).
        equation: the `EinsumDense` equation, or None for a `Dense` kernel.

    Example:

    >>> view = KernelView((16, 2, 8), "abc,cde->abde")
    >>> (view.d_in, view.d_out)
    (16, 16)
    """

    # Whether the layer's inputs are indices into the kernel's rows (an
    # embedding lookup) rather than features.
    index_inputs = False
    # Leading axes of a stack of kernels (`(experts,)` for an
    # `ExpertsKernel`): every adapter variable gets them in front, and
    # `to_matrix` returns a stack of `(d_in, d_out)` matrices.
    stack_shape = ()

    def __init__(self, kernel_shape, equation=None):
        kernel_shape = tuple(int(d) for d in kernel_shape)
        self.kernel_shape = kernel_shape
        if equation is not None:
            self.equation = equation.replace(" ", "")
            inputs, rest = self.equation.split(",")
            kernel, outputs = rest.split("->")
            self._input_term, self._kernel_term, self._output_term = (
                inputs,
                kernel,
                outputs,
            )
            bad = [c for c in kernel if (c in inputs) == (c in outputs)]
            if "." in kernel or bad or len(set(kernel)) != len(kernel):
                raise UnsupportedLayerError(
                    f"EinsumDense equation '{equation}' is not a plain "
                    "projection: every kernel axis must contract with the "
                    "inputs or reach the outputs, not both or neither."
                )
            in_axes = [i for i, c in enumerate(kernel) if c in inputs]
            out_axes = [i for i, c in enumerate(kernel) if c in outputs]
            self._batch = "".join(c for c in inputs if c not in kernel)
            leftover = set(outputs) - set(self._batch) - set(kernel)
            if leftover or set(self._batch.replace(".", "")) - set(outputs):
                raise UnsupportedLayerError(
                    f"EinsumDense equation '{equation}' is not a plain "
                    "projection: its non-kernel input axes must all reach "
                    "the outputs."
                )
            free = [c for c in string.ascii_letters if c not in self.equation]
            self._rank_letter = free[0]
        else:
            # A `Dense` kernel `(d_in, d_out)`, or a kernel whose last axis is
            # the output and whose other axes are inputs (a convolution's
            # `(*kernel_size, channels, filters)`).
            self.equation = None
            in_axes = list(range(len(kernel_shape) - 1))
            out_axes = [len(kernel_shape) - 1]
        self.perm = tuple(in_axes + out_axes)
        self.inverse_perm = tuple(
            sorted(range(len(self.perm)), key=self.perm.__getitem__)
        )
        self.in_shape = tuple(kernel_shape[i] for i in in_axes)
        self.out_shape = tuple(kernel_shape[i] for i in out_axes)
        self.d_in = math.prod(self.in_shape)
        self.d_out = math.prod(self.out_shape)
        self._transposed = self.perm != tuple(range(len(self.perm)))

    @property
    def kind(self) -> str:
        """The layer kind (`"dense"`, `"einsum_dense"`, `"embedding"`,
        `"conv"`): what `Adapter.layer_kinds` names."""
        return "dense" if self.equation is None else "einsum_dense"

    def on_first_attach(self):
        """Called when the layer takes its first adapter (after its class
        switched); `ExpertsKernel` switches its experts layer here."""

    def on_last_detach(self):
        """Called when the layer's last adapter went (class restored)."""

    def to_matrix(self, kernel):
        """Kernel (layer layout) -> `(d_in, d_out)` matrix."""
        if self._transposed:
            kernel = ops.transpose(kernel, self.perm)
        return ops.reshape(kernel, (self.d_in, self.d_out))

    def from_matrix(self, matrix):
        """`(d_in, d_out)` matrix -> kernel (layer layout)."""
        kernel = ops.reshape(matrix, self.in_shape + self.out_shape)
        if self._transposed:
            kernel = ops.transpose(kernel, self.inverse_perm)
        return kernel

    def apply(self, inputs, kernel):
        """The layer's own contraction of `inputs` with `kernel` (no bias)."""
        if self.equation is None:
            return ops.matmul(inputs, kernel)
        return ops.einsum(self.equation, inputs, kernel)

    def transposed_equation(self):
        """The einsum giving the input gradient from the output gradient."""
        return f"{self._output_term},{self._kernel_term}->{self._input_term}"

    def contract_inputs(self, inputs, factor):
        """Contracts the input axes of `inputs` with a `(d_in, r)` factor.

        Returns a tensor of shape `batch_axes + (r,)`.
        """
        if self.equation is None:
            return ops.matmul(inputs, factor)
        r = self._rank_letter
        factor = ops.reshape(factor, self.in_shape + (factor.shape[-1],))
        in_letters = "".join(c for c in self._kernel_term if c in self._input_term)
        equation = f"{self._input_term},{in_letters}{r}->{self._batch}{r}"
        return ops.einsum(equation, inputs, factor)

    def expand_outputs(self, hidden, factor):
        """Maps `batch_axes + (r,)` through an `(r, d_out)` factor.

        Returns a tensor in the layer's output layout.
        """
        if self.equation is None:
            return ops.matmul(hidden, factor)
        r = self._rank_letter
        factor = ops.reshape(factor, (factor.shape[0],) + self.out_shape)
        out_letters = "".join(c for c in self._kernel_term if c in self._output_term)
        equation = f"{self._batch}{r},{r}{out_letters}->{self._output_term}"
        return ops.einsum(equation, hidden, factor)

    def _per_example_terms(self):
        """`(inputs, in letters, batch, out letters, outputs, example letter,
        rank letter)` for contractions with one factor per example.

        The example axis is the first axis of the inputs (an ellipsis at the
        front gets an explicit letter for it).
        """
        if self.equation is None:
            inputs, kernel, outputs = "...i", "io", "...o"
        else:
            inputs, kernel, outputs = (
                self._input_term,
                self._kernel_term,
                self._output_term,
            )
        used = inputs + kernel + outputs
        free = [c for c in string.ascii_letters if c not in used]
        if inputs.startswith("..."):
            example = free.pop(0)
            inputs = example + inputs
            outputs = outputs.replace("...", example + "...")
        else:
            example = inputs[0]
            if example in kernel:
                raise UnsupportedLayerError(
                    f"Equation '{self.equation}' contracts the first input axis; "
                    "per-example adapters need the batch axis first."
                )
        batch = "".join(c for c in inputs if c not in kernel)
        in_letters = "".join(c for c in kernel if c in inputs)
        out_letters = "".join(c for c in kernel if c in outputs)
        return inputs, in_letters, batch, out_letters, outputs, example, free[0]

    def contract_inputs_per_example(self, inputs, factors):
        """`contract_inputs` with one `(d_in, r)` factor per example.

        Args:
            inputs: the layer's inputs, examples on the first axis.
            factors: `(batch, d_in, r)`, example `i`'s factor at `i`.

        Returns:
            A tensor of shape `batch_axes + (r,)`.
        """
        terms, in_letters, batch, _, _, example, r = self._per_example_terms()
        factors = ops.reshape(factors, (-1,) + self.in_shape + (factors.shape[-1],))
        equation = f"{terms},{example}{in_letters}{r}->{batch}{r}"
        return ops.einsum(equation, inputs, factors)

    def expand_outputs_per_example(self, hidden, factors):
        """`expand_outputs` with one `(r, d_out)` factor per example.

        Args:
            hidden: `batch_axes + (r,)`, as `contract_inputs_per_example`
                returns.
            factors: `(batch, r, d_out)`.

        Returns:
            A tensor in the layer's output layout.
        """
        _, _, batch, out_letters, outputs, example, r = self._per_example_terms()
        factors = ops.reshape(factors, (-1, factors.shape[1]) + self.out_shape)
        equation = f"{batch}{r},{example}{r}{out_letters}->{outputs}"
        return ops.einsum(equation, hidden, factors)

    def scale_outputs(self, outputs, vector):
        """Multiplies `outputs` (layer layout) by a `(d_out,)` vector.

        Entry `j` of `vector` scales column `j` of the 2-D view.
        """
        return ops.multiply(outputs, ops.reshape(vector, self._output_broadcast()))

    def scale_outputs_per_example(self, outputs, vectors):
        """`scale_outputs` with one `(d_out,)` vector per example.

        Args:
            outputs: the layer's outputs, examples on the first axis.
            vectors: `(batch, d_out)`.
        """
        trailing = self._output_broadcast()
        middle = len(outputs.shape) - 1 - len(trailing)
        shape = (-1,) + (1,) * middle + trailing
        return ops.multiply(outputs, ops.reshape(vectors, shape))

    def _output_broadcast(self):
        if self.equation is None:
            return (self.d_out,)
        # The output axes in the order the outputs name them, ones elsewhere.
        sizes = dict(zip(self._kernel_term, self.kernel_shape, strict=True))
        out_letters = [c for c in self._kernel_term if c in self._output_term]
        in_output_order = [
            c for c in self._output_term.replace("...", "") if c in sizes
        ]
        if in_output_order != out_letters:
            raise UnsupportedLayerError(
                f"Equation '{self.equation}' reorders the kernel's output axes; "
                "per-output scaling needs them in kernel order."
            )
        trailing = self._output_term.replace("...", "")
        first = trailing.index(out_letters[0])
        return tuple(sizes.get(c, 1) for c in trailing[first:])

    def map_inputs(self, inputs, fn):
        """Applies `fn` along the flattened input axes of `inputs`.

        `fn` maps a `(n, d_in)` tensor to a `(n, d_in)` tensor (for example
        `x -> x R` for an input-side rotation `R`). Returns a tensor shaped
        like `inputs`, ready for the projection.
        """
        if self.equation is None:
            in_positions = [len(inputs.shape) - 1]
        else:
            in_letters = [c for c in self._kernel_term if c in self._input_term]
            offset = len(inputs.shape) - len(self._input_term.replace("...", "_"))
            in_positions = [
                self._input_term.replace("...", "_").index(c) + max(offset, 0)
                for c in in_letters
            ]
        rank = len(inputs.shape)
        other = [i for i in range(rank) if i not in in_positions]
        perm = other + in_positions
        moved = inputs if perm == list(range(rank)) else ops.transpose(inputs, perm)
        moved_shape = ops.shape(moved)
        flat = fn(ops.reshape(moved, (-1, self.d_in)))
        moved = ops.reshape(flat, moved_shape)
        if perm == list(range(rank)):
            return moved
        return ops.transpose(moved, [perm.index(i) for i in range(rank)])
