{{/*
Names, labels and the shared pieces of every pod: environment, volumes and
security contexts. Stage entries are resolved once, by "pipeline.stage".
*/}}

{{- define "pipeline.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pipeline.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pipeline.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pipeline.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pipeline.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pipeline.labels" -}}
helm.sh/chart: {{ include "pipeline.chart" . }}
{{ include "pipeline.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: iot-pipeline
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "pipeline.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}
{{- end }}

{{/*
One stage's image: its own `image` (a user's stage in an image built on this
project's), else the release's. Context: dict "root" $ "image" ENTRY-IMAGE.
*/}}
{{- define "pipeline.stageImage" -}}
{{- $own := .image | default dict }}
{{- $image := merge (deepCopy $own) .root.Values.image }}
{{- if and $own.repository (not (hasKey $own "tag")) (not $own.digest) }}
{{- $_ := set $image "tag" "" }}
{{- $_ := set $image "digest" "" }}
{{- end }}
{{- if $image.digest -}}
{{ $image.repository }}@{{ $image.digest }}
{{- else -}}
{{ $image.repository }}:{{ $image.tag | default .root.Chart.AppVersion }}
{{- end }}
{{- end }}

{{- define "pipeline.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pipeline.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The stage ids `pipeline run` accepts: the stages config.stages declares.
*/}}
{{- define "pipeline.stageIds" -}}
{{- keys (.Values.config.stages | default dict) | sortAlpha | join " " }}
{{- end }}

{{/*
One stage entry resolved against stageDefaults and autoscaling.defaults, checked,
as YAML (use with fromYaml). Context: dict "root" $ "key" KEY "entry" ENTRY.
Fails the render with a message saying what to change.
*/}}
{{- define "pipeline.stage" -}}
{{- $root := .root }}
{{- $key := .key }}
{{- $entry := .entry | default dict }}
{{- $defaults := $root.Values.stageDefaults }}
{{- $stageId := $entry.stage | default $key }}
{{- if not (has $stageId (splitList " " (include "pipeline.stageIds" $root))) }}
{{- fail (printf "stages.%s: %q is not a pipeline stage; set stages.%s.stage to one of: %s" $key $stageId $key (include "pipeline.stageIds" $root)) }}
{{- end }}
{{- $name := printf "%s-%s" (include "pipeline.fullname" $root) $key }}
{{- if gt (len $name) 63 }}
{{- fail (printf "stages.%s: the object name %q is longer than 63 characters; use a shorter key or fullnameOverride" $key $name) }}
{{- end }}
{{- $spec := index ($root.Values.config.stages | default dict) $stageId }}
{{- if not $spec }}
{{- fail (printf "stages.%s runs stage %q, which config.stages does not declare" $key $stageId) }}
{{- end }}
{{- $partitions := 0 }}
{{- range $spec.inputs }}
{{- $topic := index ($root.Values.config.topics | default dict) . }}
{{- if not $topic }}
{{- fail (printf "config.stages.%s reads topic %q, which config.topics does not declare" $stageId .) }}
{{- end }}
{{- $partitions = max $partitions (int $topic.partitions) }}
{{- end }}
{{- $autoscaling := deepCopy $root.Values.autoscaling.defaults }}
{{- range $k, $v := ($entry.autoscaling | default dict) }}
{{- $_ := set $autoscaling $k $v }}
{{- end }}
{{- if $autoscaling.enabled }}
{{- if gt (int $autoscaling.minReplicas) (int $autoscaling.maxReplicas) }}
{{- fail (printf "stages.%s.autoscaling: minReplicas %d is above maxReplicas %d" $key (int $autoscaling.minReplicas) (int $autoscaling.maxReplicas)) }}
{{- end }}
{{- if gt (int $autoscaling.maxReplicas) $partitions }}
{{- fail (printf "stages.%s.autoscaling.maxReplicas is %d but the input topic of stage %s has %d partitions; a consumer beyond that would sit idle: lower maxReplicas or raise the partitions" $key (int $autoscaling.maxReplicas) $stageId $partitions) }}
{{- end }}
{{- end }}
{{- $pdb := deepCopy $defaults.podDisruptionBudget }}
{{- range $k, $v := ($entry.podDisruptionBudget | default dict) }}
{{- $_ := set $pdb $k $v }}
{{- end }}
{{- /* One of the two: the entry's choice wins, then minAvailable (never a chart default). */}}
{{- if hasKey ($entry.podDisruptionBudget | default dict) "maxUnavailable" }}
{{- $_ := unset $pdb "minAvailable" }}
{{- else if hasKey $pdb "minAvailable" }}
{{- $_ := unset $pdb "maxUnavailable" }}
{{- end }}
{{- $grace := ternary $entry.terminationGracePeriodSeconds $defaults.terminationGracePeriodSeconds (hasKey $entry "terminationGracePeriodSeconds") }}
{{- $session := ($root.Values.config.runner | default dict).session_timeout_s | default 10 }}
{{- $session = index ($entry.env | default dict) "PIPELINE_RUNNER__SESSION_TIMEOUT_S" | default (index $root.Values.env "PIPELINE_RUNNER__SESSION_TIMEOUT_S") | default $session }}
{{- if lt (float64 $grace) (mulf 2 (float64 $session)) }}
{{- fail (printf "stages.%s: terminationGracePeriodSeconds %v is less than twice the session timeout (%v s, config.runner.session_timeout_s or PIPELINE_RUNNER__SESSION_TIMEOUT_S); the worker would be killed before it leaves its consumer group" $key $grace $session) }}
{{- end }}
key: {{ $key }}
name: {{ $name }}
stage: {{ $stageId }}
enabled: {{ ternary $entry.enabled true (hasKey $entry "enabled") }}
replicas: {{ int (ternary $entry.replicas $defaults.replicas (hasKey $entry "replicas")) }}
terminationGracePeriodSeconds: {{ int $grace }}
consumerGroup: {{ printf "%s-%s" ($root.Values.config.app_prefix | default "iot-pipeline") $stageId }}
image: {{ include "pipeline.stageImage" (dict "root" $root "image" $entry.image) }}
imagePullPolicy: {{ ($entry.image | default dict).pullPolicy | default $root.Values.image.pullPolicy }}
inputs: {{ toJson $spec.inputs }}
partitions: {{ $partitions }}
autoscaling: {{ toJson $autoscaling }}
podDisruptionBudget: {{ toJson $pdb }}
{{- end }}

{{/*
Labels of one stage's objects. Context: dict "root" $ "s" RESOLVED-STAGE.
*/}}
{{- define "pipeline.stageSelectorLabels" -}}
{{ include "pipeline.selectorLabels" .root }}
app.kubernetes.io/component: {{ .s.key }}
{{- end }}

{{- define "pipeline.stageLabels" -}}
{{ include "pipeline.labels" .root }}
app.kubernetes.io/component: {{ .s.key }}
iot-pipeline/stage: {{ .s.stage }}
{{- end }}

{{/*
True ("true") when a ServiceMonitor is rendered: enabled and the API is served.
*/}}
{{- define "pipeline.serviceMonitor" -}}
{{- if and .Values.metrics.serviceMonitor.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") -}}
true
{{- end }}
{{- end }}

{{/*
Kafka connection and credentials for every container. Credentials only from
kafka.existingSecret: secretKeyRef for SASL, a secret volume for the CA.
*/}}
{{- define "pipeline.kafkaEnv" -}}
{{- $kafka := .Values.kafka -}}
- name: KAFKA_BOOTSTRAP_SERVERS
  value: {{ $kafka.bootstrapServers | quote }}
- name: PIPELINE_KAFKA_SECURITY_PROTOCOL
  value: {{ $kafka.securityProtocol | quote }}
{{- if hasPrefix "SASL_" $kafka.securityProtocol }}
{{- if not $kafka.existingSecret }}
{{- fail "kafka.securityProtocol is SASL_*: set kafka.existingSecret to the Secret holding the SASL username and password" }}
{{- end }}
- name: PIPELINE_KAFKA_SASL_MECHANISM
  value: {{ required "kafka.saslMechanism is required with a SASL_* securityProtocol" $kafka.saslMechanism | quote }}
- name: PIPELINE_KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $kafka.existingSecret }}
      key: {{ $kafka.secretKeys.username }}
- name: PIPELINE_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $kafka.existingSecret }}
      key: {{ $kafka.secretKeys.password }}
{{- end }}
{{- if $kafka.secretKeys.caCert }}
{{- if not $kafka.existingSecret }}
{{- fail "kafka.secretKeys.caCert is set: set kafka.existingSecret to the Secret holding the CA bundle" }}
{{- end }}
- name: PIPELINE_KAFKA_SSL_CAFILE
  value: /etc/kafka-ca/ca.crt
{{- end }}
{{- end }}

{{/*
Environment of every pipeline container: config, Kafka, log level, then the
user's env (global, then per stage). Context: dict "root" $ "env" STAGE-ENV.
*/}}
{{- define "pipeline.env" -}}
{{- $root := .root -}}
- name: PIPELINE_CONFIG
  value: /etc/pipeline/pipeline.yaml
{{ include "pipeline.kafkaEnv" $root }}
{{- with $root.Values.openlineage.apiKeySecret }}
{{- if .name }}
- name: PIPELINE_OPENLINEAGE__API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .name | quote }}
      key: {{ .key | quote }}
{{- end }}
{{- end }}
{{- $env := dict "PIPELINE_LOG_LEVEL" $root.Values.logLevel }}
{{- range $k, $v := $root.Values.env }}
{{- $_ := set $env $k $v }}
{{- end }}
{{- range $k, $v := (.env | default dict) }}
{{- $_ := set $env $k $v }}
{{- end }}
{{- range $k := keys $env | sortAlpha }}
- name: {{ $k }}
  value: {{ index $env $k | toString | quote }}
{{- end }}
{{- end }}

{{- define "pipeline.podSecurityContext" -}}
runAsNonRoot: true
{{- with .Values.podSecurityContext }}
{{- if not (kindIs "invalid" .runAsUser) }}
runAsUser: {{ .runAsUser }}
{{- end }}
{{- if not (kindIs "invalid" .runAsGroup) }}
runAsGroup: {{ .runAsGroup }}
{{- end }}
{{- if not (kindIs "invalid" .fsGroup) }}
fsGroup: {{ .fsGroup }}
{{- end }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Not configurable on purpose: the restricted Pod Security Standard.
*/}}
{{- define "pipeline.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Volumes and mounts of every pipeline container. Context: dict "root" $ "configMap" NAME.
*/}}
{{- define "pipeline.volumes" -}}
- name: config
  configMap:
    name: {{ .configMap }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .root.Values.tmpVolume.sizeLimit }}
{{- if .root.Values.kafka.secretKeys.caCert }}
- name: kafka-ca
  secret:
    secretName: {{ .root.Values.kafka.existingSecret }}
    defaultMode: 0444
    items:
      - key: {{ .root.Values.kafka.secretKeys.caCert }}
        path: ca.crt
{{- end }}
{{- end }}

{{- define "pipeline.volumeMounts" -}}
- name: config
  mountPath: /etc/pipeline
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if .Values.kafka.secretKeys.caCert }}
- name: kafka-ca
  mountPath: /etc/kafka-ca
  readOnly: true
{{- end }}
{{- end }}
