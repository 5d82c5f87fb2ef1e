"""vitreg_jax: Vision Transformers with registers in JAX/Flax, for TPU pods."""

from setuptools import find_packages, setup

CORE = [
    'jax>=0.10',
    'flax>=0.12',
    'optax>=0.2.6',
    'orbax-checkpoint>=0.11',
    'grain>=0.2.18',
    'tensorflow-datasets>=4.9.9',
    'array-record>=0.8',
    'ml-collections>=1.1',
    'absl-py',
    'numpy',
    'pillow',
    'safetensors>=0.4',
    'tensorboardX',
    'ftfy',
    'regex',
    'matplotlib',  # the analyses' figures
    'scipy',       # LOST's connected components
]
# torch 2.13 breaks timm here; 2.14.1 / 0.29.1 are the tested pair.
TORCH = [
    'torch==2.14.1',
    'torchvision==0.29.1',
    'timm>=1.0.15',
    'transformers>=4.48',
    'open_clip_torch>=2.30',
]
# The TPU runtime. On a host without TPUs it still compiles for any TPU topology
# (--mode=plan --plan.topology=v5e:16x16). jax's own extra pins the libtpu built
# for that jax (jax 0.10.2: libtpu 0.0.42.*), so newer jax keeps working.
TPU = ['jax[tpu]>=0.10']
NOTEBOOKS = ['nbclient', 'nbformat', 'ipykernel']
TEST = TORCH + TPU + NOTEBOOKS + ['pytest>=8', 'pytest-xdist>=3']

setup(
    name='vitreg_jax',
    version='0.1.0',
    description='Vision Transformers Need Registers, in JAX/Flax for TPU pods',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.11',
    packages=find_packages(include=['vitreg_jax', 'vitreg_jax.*']),
    package_data={'vitreg_jax.data': ['bpe_simple_vocab_16e6.txt.gz'],
                  'vitreg_jax.evals': ['data/*.json'],
                  'vitreg_jax.analysis': ['data/*.txt.gz'],
                  'vitreg_jax.models': ['data/tt_registers/*.json']},
    install_requires=CORE,
    extras_require={'torch': TORCH, 'tpu': TPU, 'test': TEST,
                    'notebooks': NOTEBOOKS + ['jupyter']},
)
