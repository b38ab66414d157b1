{{/* Chart name. */}}
{{- define "selftrain.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped name of the chart's objects. */}}
{{- define "selftrain.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "selftrain.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of one component (pass: dict "ctx" $ "component" "mlflow"). */}}
{{- define "selftrain.selectorLabels" -}}
app.kubernetes.io/name: {{ include "selftrain.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end -}}

{{/* Labels of every object (pass: dict "ctx" $ "component" "..."). */}}
{{- define "selftrain.labels" -}}
helm.sh/chart: {{ include "selftrain.chart" .ctx }}
{{ include "selftrain.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: selftrain
{{- end -}}

{{- define "selftrain.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "selftrain.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "selftrain.trainerServiceAccountName" -}}
{{- if .Values.trainerServiceAccount.create -}}
{{- default (printf "%s-trainer" (include "selftrain.fullname" .)) .Values.trainerServiceAccount.name -}}
{{- else -}}
{{- default "default" .Values.trainerServiceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The selftrain image; the placeholder repository (there is no public image) fails with what to do. */}}
{{- define "selftrain.image" -}}
{{- $repo := .Values.image.repository -}}
{{- if or (not $repo) (hasPrefix "registry.invalid/" $repo) -}}
{{- fail "image.repository is the placeholder registry.invalid/selftrain: there is no public selftrain image. Build it from the repository's Dockerfile, push it to a registry your nodes can pull from (docs/production.md, \"Image\"), and install with --set image.repository=<registry>/selftrain --set image.tag=<tag>" -}}
{{- end -}}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "selftrain.dataClaim" -}}
{{- default (printf "%s-data" (include "selftrain.fullname" .)) .Values.persistence.data.existingClaim -}}
{{- end -}}

{{- define "selftrain.checkpointsClaim" -}}
{{- default (printf "%s-checkpoints" (include "selftrain.fullname" .)) .Values.persistence.checkpoints.existingClaim -}}
{{- end -}}

{{- define "selftrain.mlflowName" -}}
{{- printf "%s-mlflow" (include "selftrain.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "selftrain.mlflowClaim" -}}
{{- default (include "selftrain.mlflowName" .) .Values.mlflow.persistence.existingClaim -}}
{{- end -}}

{{/* Does the MLflow server keep anything on its PVC? */}}
{{- define "selftrain.mlflowNeedsVolume" -}}
{{- if or (eq .Values.mlflow.backend.type "sqlite") (eq .Values.mlflow.artifacts.type "pvc") -}}true{{- end -}}
{{- end -}}

{{- define "selftrain.mlflowImage" -}}
{{- $full := or (eq .Values.mlflow.backend.type "postgres") (eq .Values.mlflow.artifacts.type "s3") -}}
{{- $tag := default (printf "v%s%s" .Values.mlflow.version (ternary "-full" "" $full)) .Values.mlflow.image.tag -}}
{{- printf "%s:%s" .Values.mlflow.image.repository $tag -}}
{{- end -}}

{{- define "selftrain.trackingUri" -}}
{{- if .Values.mlflow.enabled -}}
{{- printf "http://%s:%v" (include "selftrain.mlflowName" .) .Values.mlflow.service.port -}}
{{- else -}}
{{- required "mlflow.externalUri is required when mlflow.enabled is false" .Values.mlflow.externalUri -}}
{{- end -}}
{{- end -}}

{{- define "selftrain.run" -}}
{{- default .Release.Name .Values.driver.run -}}
{{- end -}}

{{/*
The pipeline config the driver runs: values.pipeline (less the other pipelines' method sections) with the parts the
chart owns set:
image, workspace on the PVC mount paths (so paths mean the same in driver and trainers),
tracking.uri, and the executor's kubernetes section (namespace, trainer ServiceAccount, PVCs,
trainer placement, gang scheduling).
*/}}
{{- define "selftrain.pipelineConfig" -}}
{{- $p := deepCopy .Values.pipeline -}}
{{- /* the method sections of the other built-in pipelines are dropped (values merge the chart's partdistillation
       defaults into any override), so `pipeline: {pipeline: casp, casp: {...}}` is all a CaSP release sets; the list
       is PIPELINES in pipelines/config.py (tests/k8s/test_chart_pipelines.py keeps them equal) */ -}}
{{- range $name := list "partdistillation" "casp" "luss" "dense" -}}
{{- if ne $name (toString $p.pipeline) }}{{ $_ := unset $p $name }}{{ end -}}
{{- end -}}
{{- $k8s := dict
    "namespace" .Release.Namespace
    "service_account" (include "selftrain.trainerServiceAccountName" .)
    "image_pull_policy" .Values.image.pullPolicy
    "data_pvc" (include "selftrain.dataClaim" .)
    "data_mount" "/data"
    "checkpoints_pvc" (include "selftrain.checkpointsClaim" .)
    "checkpoints_mount" "/checkpoints"
    "node_selector" .Values.trainers.nodeSelector
    "tolerations" .Values.trainers.tolerations
    "labels" (dict "selftrain.io/release" .Release.Name)
-}}
{{- with .Values.trainers.shmSize }}{{ $_ := set $k8s "shm_size" . }}{{ end -}}
{{- with .Values.trainers.env }}{{ $_ := set $k8s "env" . }}{{ end -}}
{{- /* trainer placement, priority and extra resources (KubernetesConfig in pipelines/config.py); written only when set */ -}}
{{- with .Values.trainers.affinity }}{{ $_ := set $k8s "affinity" . }}{{ end -}}
{{- with .Values.trainers.priorityClassName }}{{ $_ := set $k8s "priority_class_name" . }}{{ end -}}
{{- with .Values.trainers.extraResources }}{{ $_ := set $k8s "extra_resources" . }}{{ end -}}
{{- with .Values.trainers.byStageKind -}}
{{- $byKind := dict -}}
{{- range $kind, $pl := . -}}
{{- $one := dict -}}
{{- if hasKey $pl "nodeSelector" }}{{ $_ := set $one "node_selector" $pl.nodeSelector }}{{ end -}}
{{- if hasKey $pl "tolerations" }}{{ $_ := set $one "tolerations" $pl.tolerations }}{{ end -}}
{{- if hasKey $pl "affinity" }}{{ $_ := set $one "affinity" $pl.affinity }}{{ end -}}
{{- $_ := set $byKind $kind $one -}}
{{- end -}}
{{- $_ := set $k8s "placement_by_kind" $byKind -}}
{{- end -}}
{{- if eq .Values.scheduling.gang "volcano" -}}
{{- $sp := dict "queue" .Values.scheduling.volcano.queue -}}
{{- with .Values.scheduling.volcano.priorityClass }}{{ $_ := set $sp "priorityClass" . }}{{ end -}}
{{- with .Values.scheduling.volcano.minAvailable }}{{ $_ := set $sp "minAvailable" . }}{{ end -}}
{{- $_ := set $k8s "scheduling_policy" $sp -}}
{{- else if eq .Values.scheduling.gang "kueue" -}}
{{- $_ := set $k8s.labels "kueue.x-k8s.io/queue-name" .Values.scheduling.kueue.queueName -}}
{{- end -}}
{{- $exec := default dict $p.executor -}}
{{- $_ := set $exec "kind" "kubernetes" -}}
{{- $_ := set $exec "kubernetes" (mustMergeOverwrite (default dict $exec.kubernetes) $k8s) -}}
{{- $_ := set $p "executor" $exec -}}
{{- $_ := set $p "image" (include "selftrain.image" .) -}}
{{- $ws := default dict $p.workspace -}}
{{- $_ := set $p "workspace" (mustMergeOverwrite (dict "dvc_remote" "/data/dvc-remote") $ws (dict "root" "/checkpoints" "data" "/data" "runs" "/checkpoints" "mlflow" "/checkpoints/mlflow")) -}}
{{- $tr := default dict $p.tracking -}}
{{- $_ := set $tr "uri" (include "selftrain.trackingUri" .) -}}
{{- $_ := set $p "tracking" $tr -}}
{{- toYaml $p -}}
{{- end -}}

{{/*
Name of the driver Job: a hash of everything its pod runs with (the pipeline config, the run name, the
image, the driver and pod settings, the chart version). `helm upgrade` with the same config keeps the Job
(no new run of the driver); a changed config gives a new Job, which resumes the run (finished stages are skipped).
*/}}
{{- define "selftrain.driverJobName" -}}
{{- $in := list (include "selftrain.pipelineConfig" .) (include "selftrain.run" .) .Chart.Version .Values.driver .Values.image .Values.imagePullSecrets .Values.podSecurityContext .Values.securityContext .Values.nodeSelector .Values.tolerations .Values.affinity .Values.priorityClassName -}}
{{- printf "%s-driver-%s" (include "selftrain.fullname" . | trunc 45 | trimSuffix "-") (toJson $in | sha256sum | trunc 10) -}}
{{- end -}}

{{/* affinity and priorityClassName of the chart's own pods (driver, MLflow, hooks), at pod spec indent. */}}
{{- define "selftrain.podPlacement" -}}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{/*
The verbs the kubernetes executor uses (pipelines/executors/kubernetes.py): the driver's Role grants
exactly these, and `helm test` checks each one with a SelfSubjectAccessReview. Lines: group resource verb...
*/}}
{{- define "selftrain.driverRules" -}}
kubeflow.org pytorchjobs create get delete
- pods list delete
- pods/log get
- events list
{{- end -}}
