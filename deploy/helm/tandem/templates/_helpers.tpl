{{/*
Names, labels and the pieces shared by the head and the two worker groups.
*/}}

{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's resource name prefix; also the RayCluster's name (ray.io/cluster label). */}}
{{- define "tandem.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tandem.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "tandem.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Selects every Ray pod of this release (head and workers), as KubeRay labels them. */}}
{{- define "tandem.rayPodSelector" -}}
ray.io/cluster: {{ include "tandem.fullname" . }}
{{- end }}

{{- define "tandem.redisSelector" -}}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{/* The prefix index's Redis URL; empty: no Redis (the router keeps the index itself). */}}
{{- define "tandem.redisURL" -}}
{{- if .Values.redis.enabled }}
{{- printf "%s://%s-redis:6379/0" (ternary "rediss" "redis" (eq (include "tandem.redisTLS" .) "true")) (include "tandem.fullname" .) }}
{{- else }}
{{- .Values.redis.external.url }}
{{- end }}
{{- end }}

{{/* The Secret holding the Redis password, and its key; empty name: no password. */}}
{{- define "tandem.redisSecretName" -}}
{{- if .Values.redis.enabled }}
{{- default (printf "%s-redis" (include "tandem.fullname" .)) .Values.redis.auth.existingSecret }}
{{- else if .Values.redis.external.url }}
{{- .Values.redis.external.existingSecret }}
{{- end }}
{{- end }}

{{- define "tandem.redisSecretKey" -}}
{{- if .Values.redis.enabled }}{{ .Values.redis.auth.secretKey }}{{ else }}{{ .Values.redis.external.secretKey }}{{ end }}
{{- end }}

{{- define "tandem.redisCaDir" -}}/etc/tandem/redis-ca{{- end }}

{{/* The KV-pairing secret: its Secret's name, and where every Ray pod mounts it. */}}
{{- define "tandem.kvSecretName" -}}
{{- default (printf "%s-kv" (include "tandem.fullname" .)) .Values.kv.secret.existingSecret }}
{{- end }}

{{- define "tandem.kvSecretDir" -}}/etc/tandem/kv{{- end }}

{{/* The Secret of the router's API keys (router.auth), and where the head mounts it. */}}
{{- define "tandem.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "tandem.fullname" .)) .Values.router.auth.existingSecret }}
{{- end }}
{{- define "tandem.apiKeysDir" -}}/etc/tandem/api-keys{{- end }}

{{/* The Secret of the Admin service's key (router.admin): "admin-keys", the router's keys file
("self-prestop:<key>": it drains only its caller's node), and "admin-key", the bare key worker pods' preStop hooks send. Where the head
mounts the first and every worker pod the second. */}}
{{- define "tandem.adminSecretName" -}}
{{- default (printf "%s-admin" (include "tandem.fullname" .)) .Values.router.admin.existingSecret }}
{{- end }}
{{- define "tandem.adminDir" -}}/etc/tandem/admin{{- end }}
{{- define "tandem.adminTlsDir" -}}/etc/tandem/admin-tls{{- end }}
{{/* The preStop drain speaks plaintext unless router.admin.tlsCaSecret names the CA of a
router serving TLS (--tls-cert in tandem.extraArgs): refuse the pair that would fail at every
pod's stop. */}}
{{- define "tandem.checkAdminTls" -}}
{{- $tls := false }}
{{- range .Values.tandem.extraArgs }}{{ if hasPrefix "--tls-cert" (toString .) }}{{ $tls = true }}{{ end }}{{ end }}
{{- if and $tls .Values.router.admin.drainOnStop (not .Values.router.admin.tlsCaSecret) }}
{{- fail "the router serves TLS (--tls-cert in tandem.extraArgs) and router.admin.drainOnStop is on: set router.admin.tlsCaSecret (a Secret with ca.crt, the CA of the router's certificate) so that worker pods' preStop drain can reach it, or set drainOnStop false" }}
{{- end }}
{{- end }}

{{/* Volumes and mounts of the router alone (the head pod): its API keys, its admin keys. */}}
{{- define "tandem.routerVolumeMounts" -}}
{{- if .Values.router.auth.enabled }}
- name: api-keys
  mountPath: {{ include "tandem.apiKeysDir" . }}
  readOnly: true
{{- end }}
{{- if .Values.router.admin.drainOnStop }}
- name: admin-keys
  mountPath: {{ include "tandem.adminDir" . }}
  readOnly: true
{{- end }}
{{- end }}
{{- define "tandem.routerVolumes" -}}
{{- if .Values.router.auth.enabled }}
- name: api-keys
  secret:
    secretName: {{ include "tandem.apiKeysSecretName" . }}
    defaultMode: 0440  # root, and the pod's fsGroup (the ray user)
    items:
      - key: {{ .Values.router.auth.secretKey }}
        path: {{ .Values.router.auth.secretKey }}
{{- end }}
{{- if .Values.router.admin.drainOnStop }}
- name: admin-keys
  secret:
    secretName: {{ include "tandem.adminSecretName" . }}
    defaultMode: 0440
    items:
      - key: admin-keys
        path: admin-keys
{{- end }}
{{- end }}

{{/* The KV port range as "MIN-MAX", after checking it. */}}
{{- define "tandem.kvPorts" -}}
{{- $r := .Values.kv.portRange }}
{{- if lt (int $r.max) (add (int $r.min) 63) }}
{{- fail (printf "kv.portRange %v-%v: need max >= min + 63 (64 ports at least)" $r.min $r.max) }}
{{- end }}
{{- printf "%d-%d" (int $r.min) (int $r.max) }}
{{- end }}

{{/* Does the in-cluster Redis serve TLS? */}}
{{- define "tandem.redisTLS" -}}
{{- if and .Values.redis.enabled .Values.redis.tls.enabled }}
{{- if not .Values.redis.tls.secretName }}
{{- fail "redis.tls.enabled needs redis.tls.secretName (a Secret with tls.crt, tls.key and ca.crt)" }}
{{- end }}true
{{- end }}
{{- end }}

{{/* A worker group's replica bounds. Called with (dict "root" $ "pool" ...). */}}
{{- define "tandem.checkReplicas" -}}
{{- $g := index .root.Values .pool }}
{{- if not (and (le (int $g.minReplicas) (int $g.replicas)) (le (int $g.replicas) (int $g.maxReplicas))) }}
{{- fail (printf "%s: need minReplicas <= replicas <= maxReplicas, got %v <= %v <= %v" .pool $g.minReplicas $g.replicas $g.maxReplicas) }}
{{- end }}
{{- end }}

{{/*
Worker slots a group can offer: maxReplicas pods x workersPerPod (replicas pods when Ray's
autoscaler is off, as KubeRay then keeps exactly that many). Called with (dict "root" $ "pool" ...).
*/}}
{{- define "tandem.poolCapacity" -}}
{{- include "tandem.checkReplicas" . }}
{{- $g := index .root.Values .pool }}
{{- $pods := ternary $g.maxReplicas $g.replicas .root.Values.ray.autoscaler.enabled }}
{{- mul (int $pods) (int $g.workersPerPod) }}
{{- end }}

{{/*
Tandem's autoscaler bounds of one pool as "min max": tandem.autoscaling.<pool>.minWorkers/maxWorkers,
by default the group's minReplicas (at least one worker: Tandem keeps every pool non-empty) and
its capacity (tandem.poolCapacity) in workers. Called with (dict "root" $ "pool" ...).
*/}}
{{- define "tandem.autoscaleBounds" -}}
{{- $root := .root }}
{{- $pool := .pool }}
{{- $g := index $root.Values $pool }}
{{- $p := index $root.Values.tandem.autoscaling $pool }}
{{- $capacity := int (include "tandem.poolCapacity" .) }}
{{- $min := max 1 (mul (int $g.minReplicas) (int $g.workersPerPod)) }}
{{- if not (kindIs "invalid" $p.minWorkers) }}{{ $min = int $p.minWorkers }}{{ end }}
{{- $max := $capacity }}
{{- if not (kindIs "invalid" $p.maxWorkers) }}{{ $max = int $p.maxWorkers }}{{ end }}
{{- if lt $max $min }}
{{- fail (printf "tandem.autoscaling.%s: need minWorkers <= maxWorkers, got %d > %d (defaults: %s.minReplicas x workersPerPod, at least 1, and %s.maxReplicas x workersPerPod)" $pool $min $max $pool $pool) }}
{{- end }}
{{- if and $root.Values.tandem.poolResources (gt $max $capacity) }}
{{- fail (printf "tandem.autoscaling.%s.maxWorkers %d: the %s group offers only %d worker slots (%s.maxReplicas x workersPerPod, or replicas with ray.autoscaler off); the rest would never be placed" $pool $max $pool $capacity $pool) }}
{{- end }}
{{- printf "%d %d" $min $max }}
{{- end }}

{{/*
The FP8 values (tandem.quantization, fp8WeightCalibration, kvCacheDtype, kvCacheScales,
kvCacheScalesFile) go to
`tandem serve`, which applies them to both pools. Scales without an FP8 KV cache are refused
here: Tandem would ignore kvCacheScales, and stop at start-up on a scales file (the router's
EngineConfig check), which the head pod would only show as restarts.
*/}}
{{- define "tandem.checkFp8" -}}
{{- $t := .Values.tandem }}
{{- $fp8KV := eq (toString $t.kvCacheDtype) "fp8" }}
{{- if and $t.fp8WeightCalibration (ne (toString $t.quantization) "fp8") }}
{{- fail (printf "tandem.fp8WeightCalibration %s: how FP8 weights are rounded; set tandem.quantization fp8, or fp8WeightCalibration null" $t.fp8WeightCalibration) }}
{{- end }}
{{- if and $t.kvCacheScales (not $fp8KV) }}
{{- fail (printf "tandem.kvCacheScales %s: the scales of an FP8 KV cache; set tandem.kvCacheDtype fp8, or kvCacheScales null" $t.kvCacheScales) }}
{{- end }}
{{- if and $t.kvCacheScalesFile (or (not $fp8KV) (eq (toString $t.kvCacheScales) "per-token")) }}
{{- fail "tandem.kvCacheScalesFile is a per-head FP8 KV scale table: it needs tandem.kvCacheDtype fp8 and tandem.kvCacheScales per-head (or null)" }}
{{- end }}
{{- end }}

{{/*
The router's command line, one argument per list item. The custom Ray resources pin each pool
to its worker group (flags --prefill-resources/--decode-resources, see values tandem.poolResources).
*/}}
{{- define "tandem.serveArgs" -}}
{{- $t := .Values.tandem }}
{{- $args := list "tandem" }}
{{- if $t.verbose }}{{ $args = append $args "-v" }}{{ end }}
{{- $args = concat $args (list "serve" "--host" "0.0.0.0" "--port" (toString .Values.router.port) "--address" "auto") }}
{{- $args = concat $args (list "--device" $t.device "--mode" "disaggregated") }}
{{- $args = concat $args (list "--prefill-workers" (toString $t.prefillWorkers) "--decode-workers" (toString $t.decodeWorkers)) }}
{{- $args = concat $args (list "--cache-weight" (toString $t.cacheWeight)) }}
{{- $args = concat $args (list "--shutdown-grace" (toString $t.shutdownGraceSeconds)) }}
{{- if $t.model }}{{ $args = concat $args (list "--model" $t.model) }}{{ end }}
{{- include "tandem.checkFp8" . }}
{{- /* each FP8 value set (null: no flag), and not also in extraArgs, where argparse would let
the later one win silently */}}
{{- $fp8 := list (list "quantization" "--quantization") (list "fp8WeightCalibration" "--fp8-weight-calibration") (list "kvCacheDtype" "--kv-cache-dtype") (list "kvCacheScales" "--kv-cache-scales") (list "kvCacheScalesFile" "--kv-cache-scales-file") }}
{{- range $pair := $fp8 }}
{{- $key := index $pair 0 }}
{{- $flag := index $pair 1 }}
{{- with index $t $key }}
{{- range $t.extraArgs }}
{{- if or (eq (toString .) $flag) (hasPrefix (printf "%s=" $flag) (toString .)) }}
{{- fail (printf "tandem.%s sets %s, which tandem.extraArgs passes too: keep one" $key $flag) }}
{{- end }}
{{- end }}
{{- $args = concat $args (list $flag .) }}
{{- end }}
{{- end }}
{{- $url := include "tandem.redisURL" . }}
{{- if $url }}{{ $args = concat $args (list "--redis-url" $url) }}{{ end }}
{{- if include "tandem.redisCaSecret" . }}
{{- $args = concat $args (list "--redis-tls-ca-file" (printf "%s/ca.crt" (include "tandem.redisCaDir" .))) }}
{{- end }}
{{- $args = concat $args (list "--kv-ports" (include "tandem.kvPorts" .)) }}
{{- with .Values.kv.interface }}{{ $args = concat $args (list "--kv-interface" .) }}{{ end }}
{{- if $t.poolResources }}
{{- $args = concat $args (list "--prefill-resources" "{\"tandem_prefill\": 1}" "--decode-resources" "{\"tandem_decode\": 1}") }}
{{- end }}
{{- if .Values.metrics.enabled }}
{{- $args = concat $args (list "--metrics-port" (toString (int .Values.metrics.port))) }}
{{- end }}
{{- with .Values.tracing.otlpEndpoint }}{{ $args = concat $args (list "--otlp-endpoint" .) }}{{ end }}
{{- if .Values.router.auth.enabled }}
{{- $args = concat $args (list "--api-keys-file" (printf "%s/%s" (include "tandem.apiKeysDir" .) .Values.router.auth.secretKey)) }}
{{- with .Values.router.auth.tenantMaxInflight }}{{ $args = concat $args (list "--tenant-max-inflight" (toString (int .))) }}{{ end }}
{{- end }}
{{- if .Values.router.admin.drainOnStop }}
{{- $args = concat $args (list "--admin-keys-file" (printf "%s/admin-keys" (include "tandem.adminDir" .))) }}
{{- end }}
{{- if $t.autoscaling.enabled }}
{{- $args = append $args "--autoscale" }}
{{- range $pool := list "prefill" "decode" }}
{{- $bounds := splitList " " (include "tandem.autoscaleBounds" (dict "root" $ "pool" $pool)) }}
{{- $args = concat $args (list (printf "--%s-min-workers" $pool) (index $bounds 0) (printf "--%s-max-workers" $pool) (index $bounds 1)) }}
{{- end }}
{{- $targets := list (list "prefill" "targetQueuedTokens" "--target-queued-tokens") (list "prefill" "targetTtftMs" "--target-ttft-ms") (list "decode" "targetKvUsage" "--target-kv-usage") (list "decode" "targetItlMs" "--target-itl-ms") }}
{{- range $target := $targets }}
{{- $value := index (index $t.autoscaling (index $target 0)) (index $target 1) }}
{{- if not (kindIs "invalid" $value) }}{{ $args = concat $args (list (index $target 2) (toString $value)) }}{{ end }}
{{- end }}
{{- end }}
{{- $args = concat $args $t.extraArgs }}
{{- range $i, $arg := $args }}
{{- $arg = toString $arg }}
{{- if contains "'" $arg }}{{ fail (printf "tandem serve argument %q: no single quotes" $arg) }}{{ end }}
{{- if $i }} {{ end }}
{{- if regexMatch "^[A-Za-z0-9_./:=@%+,-]+$" $arg }}{{ $arg }}{{ else }}{{ squote $arg }}{{ end }}
{{- end }}
{{- end }}

{{/* The router's Redis password (workers get it from the router with their index config). */}}
{{- define "tandem.redisPasswordEnv" -}}
{{- $secret := include "tandem.redisSecretName" . }}
{{- if $secret }}
- name: TANDEM_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ include "tandem.redisSecretKey" . }}
{{- end }}
{{- end }}

{{/* The Secret whose ca.crt the router checks Redis' certificate against; empty: none. */}}
{{- define "tandem.redisCaSecret" -}}
{{- if eq (include "tandem.redisTLS" .) "true" }}
{{- .Values.redis.tls.secretName }}
{{- else if not .Values.redis.enabled }}
{{- .Values.redis.external.caSecret }}
{{- end }}
{{- end }}

{{/* Environment of every Ray container: where the KV-pairing secret is. */}}
{{- define "tandem.kvEnv" -}}
- name: TANDEM_KV_SECRET_FILE
  value: {{ printf "%s/%s" (include "tandem.kvSecretDir" .) .Values.kv.secret.secretKey }}
{{- end }}

{{- define "tandem.rayVolumeMounts" -}}
- name: kv-secret
  mountPath: {{ include "tandem.kvSecretDir" . }}
  readOnly: true
{{- if .Values.model.volume }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- if include "tandem.redisCaSecret" . }}
- name: redis-ca
  mountPath: {{ include "tandem.redisCaDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "tandem.rayVolumes" -}}
- name: kv-secret
  secret:
    secretName: {{ include "tandem.kvSecretName" . }}
    defaultMode: 0440  # root, and the pod's fsGroup (the ray user)
    items:
      - key: {{ .Values.kv.secret.secretKey }}
        path: {{ .Values.kv.secret.secretKey }}
{{- if .Values.model.volume }}
- name: model
{{ toYaml .Values.model.volume | indent 2 }}
{{- end }}
{{- with include "tandem.redisCaSecret" . }}
- name: redis-ca
  secret:
    secretName: {{ . }}
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- end }}

{{/*
One worker group: prefill or decode. Called with (dict "root" $ "pool" "prefill").
*/}}
{{- define "tandem.workerGroup" -}}
{{- $root := .root }}
{{- $pool := .pool }}
{{- $g := index $root.Values $pool }}
{{- $cuda := eq $root.Values.tandem.device "cuda" }}
{{- if $root.Values.tandem.poolResources }}
{{- range $key := list "num-cpus" "num-gpus" "memory" "resources" }}
{{- if hasKey $g.rayStartParams $key }}
{{- fail (printf "%s.rayStartParams.%s: KubeRay derives it from the pod's resources when tandem.poolResources is on; set %s.resources instead" $pool $key $pool) }}
{{- end }}
{{- end }}
{{- end }}
{{- include "tandem.checkReplicas" . }}
- groupName: {{ $pool }}
  replicas: {{ $g.replicas }}
  minReplicas: {{ $g.minReplicas }}
  maxReplicas: {{ $g.maxReplicas }}
  {{- if not (kindIs "invalid" $g.idleTimeoutSeconds) }}
  {{- if not (and $root.Values.ray.autoscaler.enabled (eq $root.Values.ray.autoscaler.version "v2")) }}
  {{- fail (printf "%s.idleTimeoutSeconds needs ray.autoscaler.enabled and version v2" $pool) }}
  {{- end }}
  idleTimeoutSeconds: {{ $g.idleTimeoutSeconds }}
  {{- end }}
  {{- /* Ray picks its own ports at random from the ephemeral range, which worker pods give to
  KV (net.ipv4.ip_local_port_range below): they are pinned outside it instead. */}}
  {{- $pinned := dict "node-manager-port" "6380" "object-manager-port" "6381" "runtime-env-agent-port" "6382" "dashboard-agent-grpc-port" "6383" }}
  {{- $params := mustMergeOverwrite $pinned (deepCopy $g.rayStartParams) }}
  {{- range $key, $port := $params }}
  {{- if and (hasSuffix "-port" $key) (regexMatch "^[0-9]+$" (toString $port)) (ge (int $port) (int $root.Values.kv.portRange.min)) (le (int $port) (int $root.Values.kv.portRange.max)) }}
  {{- fail (printf "%s.rayStartParams.%s %v is in kv.portRange %s: keep Ray's ports out of it" $pool $key $port (include "tandem.kvPorts" $root)) }}
  {{- end }}
  {{- end }}
  rayStartParams:
    {{- toYaml $params | nindent 4 }}
  {{- if $root.Values.tandem.poolResources }}
  # Worker slots of this pool: each Tandem worker asks for one (--{{ $pool }}-resources).
  resources:
    tandem_{{ $pool }}: {{ $g.workersPerPod | toString | quote }}
  {{- end }}
  template:
    metadata:
      labels:
        {{- include "tandem.labels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ $pool }}
      {{- with $g.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      automountServiceAccountToken: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- /* ephemeral ports (gloo's and NCCL's listeners) in the KV range */}}
        {{- $range := splitList "-" (include "tandem.kvPorts" $root) }}
        {{- $sysctl := dict "name" "net.ipv4.ip_local_port_range" "value" (join " " $range) }}
        {{- $context := deepCopy $root.Values.podSecurityContext }}
        {{- $_ := set $context "sysctls" (append (default (list) $context.sysctls) $sysctl) }}
        {{- toYaml $context | nindent 8 }}
      containers:
        - name: ray-worker
          image: {{ include "tandem.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          # KubeRay generates the `ray start` command and the raylet health probes.
          resources:
            requests:
              {{- toYaml $g.resources.requests | nindent 14 }}
              {{- if $cuda }}
              nvidia.com/gpu: {{ $g.workersPerPod | toString | quote }}
              {{- end }}
            limits:
              {{- toYaml $g.resources.limits | nindent 14 }}
              {{- if $cuda }}
              nvidia.com/gpu: {{ $g.workersPerPod | toString | quote }}
              {{- end }}
          env:
            {{- include "tandem.kvEnv" $root | nindent 12 }}
            {{- with $root.Values.tandem.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- $drain := $root.Values.router.admin.drainOnStop }}
          {{- if $drain }}
            - name: TANDEM_POD_IP
              valueFrom:
                fieldRef:
                  fieldPath: status.podIP
          # Group scale-down, pod deletion and node drains all stop a worker pod with preStop
          # then SIGTERM: the router first drains this pod's Ray node (its decode streams move
          # with their KV, its prefills finish, replacements start on other pods), then Ray
          # stops. The admin key is read from its file (--admin-key-file), never put in Ray's
          # environment; a router serving TLS is checked against router.admin.tlsCaSecret.
          {{- include "tandem.checkAdminTls" $root }}
          lifecycle:
            preStop:
              exec:
                command:
                  - /bin/sh
                  - -c
                  - >-
                    exec tandem drain-node --if-present
                    --admin-key-file {{ include "tandem.adminDir" $root }}/admin-key
                    --router {{ include "tandem.fullname" $root }}:{{ $root.Values.router.service.port }}
                    --node-ip "$TANDEM_POD_IP"
                    --timeout-s {{ $root.Values.router.admin.drainTimeoutSeconds }}
                    {{- if $root.Values.router.admin.tlsCaSecret }}
                    --tls-ca {{ include "tandem.adminTlsDir" $root }}/ca.crt
                    {{- end }}
          {{- end }}
          {{- with include "tandem.rayVolumeMounts" $root }}
          volumeMounts:
            {{- . | trim | nindent 12 }}
            {{- if $drain }}
            - name: admin-key
              mountPath: {{ include "tandem.adminDir" $root }}
              readOnly: true
            {{- if $root.Values.router.admin.tlsCaSecret }}
            - name: admin-tls-ca
              mountPath: {{ include "tandem.adminTlsDir" $root }}
              readOnly: true
            {{- end }}
            {{- end }}
          {{- end }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
      {{- if $drain }}
      # The preStop drain (its timeout), the DrainNode call's margin and Ray's stop.
      terminationGracePeriodSeconds: {{ add (int $root.Values.router.admin.drainTimeoutSeconds) 60 }}
      {{- end }}
      {{- with include "tandem.rayVolumes" $root }}
      volumes:
        {{- . | trim | nindent 8 }}
        {{- if $drain }}
        - name: admin-key
          secret:
            secretName: {{ include "tandem.adminSecretName" $root }}
            defaultMode: 0440
            items:
              - key: admin-key
                path: admin-key
        {{- with $root.Values.router.admin.tlsCaSecret }}
        - name: admin-tls-ca
          secret:
            secretName: {{ . }}
            items:
              - key: ca.crt
                path: ca.crt
        {{- end }}
        {{- end }}
      {{- end }}
      {{- with $g.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}
